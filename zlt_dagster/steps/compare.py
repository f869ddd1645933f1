"""Step `cell_comparison`: one cell across sweeps that differ in one thing (seed, marker tail), from a follow-up
file; the numbers and the figure come from core/compare.py."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ..core.compare import build_comparison, load_followup, plot_comparison
from ..core.protocol import Cell, Sweep
from ..storage import ObjectStore
from . import layout


def gather(store: ObjectStore, name: str, sweeps: Sequence[Sweep], cells: Sequence[Cell]) -> dict[str, Any]:
    """build_comparison over every (sweep, cell) marker_rates.json committed in ``store`` (others: missing)."""
    rates = {}
    for sweep in sweeps:
        for cell in cells:
            prefix = layout.cell_prefix(sweep.sweep_id, cell, "marker_rates")
            if store.artifact_exists(prefix):
                rates[(sweep.sweep_id, cell.key)] = json.loads(store.read_artifact_file(prefix, "marker_rates.json"))
    return build_comparison(name, sweeps, cells, rates)


def run_comparison(store: ObjectStore, followup_path: str | Path) -> dict[str, Any]:
    """Gather, write comparison.json + PNG + PDF under comparisons/<file stem>/ in `store`. Returns {comparison,
    png (bytes), artifact, png_uri}; ProtocolError for a bad follow-up file."""
    sweeps, cells = load_followup(followup_path)
    name = Path(followup_path).stem
    comparison = gather(store, name, sweeps, cells)
    prefix = layout.comparison_prefix(name)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "comparison.json").write_text(json.dumps(comparison, indent=1))
        plot_comparison(comparison, Path(tmp) / "comparison.png", Path(tmp) / "comparison.pdf")
        png = (Path(tmp) / "comparison.png").read_bytes()
        store.commit_artifact(prefix, tmp, meta={"followup": str(followup_path), "name": name})
    return {"comparison": comparison, "png": png, "artifact": store.uri(prefix),
            "png_uri": store.uri(f"{prefix}/comparison.png")}
