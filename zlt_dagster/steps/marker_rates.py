"""Step `marker_rates`: per-persona marker rates (Wilson 95%), headline numbers and the regime of one cell."""
from __future__ import annotations

import json

from ..core import metrics
from ..core.protocol import Cell, Sweep
from ..storage import ObjectStore
from . import layout
from .common import artifact_meta
from .completions import load_completions


def run_marker_rates(store: ObjectStore, sweep: Sweep, cell: Cell) -> dict:
    """Commit the cell's marker_rates.json (core.metrics.marker_rates_report + the cell); returns it + `artifact`."""
    rep = metrics.marker_rates_report(load_completions(store, sweep, cell), sweep.source_persona, sweep.protocol)
    rep["cell"] = cell.to_dict()
    prefix = layout.cell_prefix(sweep.sweep_id, cell, "marker_rates")
    store.commit_bytes_artifact(prefix, {"marker_rates.json": json.dumps(rep, indent=1).encode(),
                                         "sweep.json": sweep.to_json().encode()},
                                meta=artifact_meta(sweep, cell=cell.key))
    return {**rep, "artifact": store.uri(prefix)}
