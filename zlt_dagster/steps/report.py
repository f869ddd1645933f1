"""Steps `compiled_results` and `heatmap`: every finished cell of a sweep in one JSON, and its three-panel figure."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..core import report
from ..core.protocol import Sweep
from ..storage import ObjectStore
from . import layout
from .common import artifact_meta, require


def _read_json_artifact(store, prefix, name):
    return json.loads(store.read_artifact_file(prefix, name)) if store.artifact_exists(prefix) else None


def run_compile(store: ObjectStore, sweep: Sweep) -> dict:
    """Gather every cell that has marker rates; list the others as missing (never invent them). Returns
    {compiled, n_cells, missing_cells, artifact}."""
    records, missing = {}, []
    for cell in sweep.cells():
        rates = _read_json_artifact(store, layout.cell_prefix(sweep.sweep_id, cell, "marker_rates"),
                                    "marker_rates.json")
        if rates is None:
            missing.append(cell.key)
            continue
        adapter_prefix = layout.cell_prefix(sweep.sweep_id, cell, "adapter")
        train = _read_json_artifact(store, adapter_prefix, "train_run.json") or {}
        arc_res = _read_json_artifact(store, layout.cell_prefix(sweep.sweep_id, cell, "arc_scores"),
                                      "arc_scores.json")
        records[cell.key] = {
            "cell": cell.to_dict(),
            "marker_rates": rates,
            "arc": None if arc_res is None else {k: arc_res[k] for k in ("acc", "acc_norm", "n")},
            "train": {**{k: train.get(k) for k in ("steps", "tokens", "supervised_tokens", "tokens_per_s",
                                                   "first_loss", "final_loss", "data_hash")},
                      "wall_seconds": train.get("wall_s"), "gpu_seconds": train.get("gpu_s")},
            # keys relative to the store's root (the compiled JSON lives in the same store): no machine paths
            "artifacts": {a: layout.cell_prefix(sweep.sweep_id, cell, a) for a in layout.CELL_ARTIFACTS},
        }
    compiled = report.compile_results(sweep, records, missing)
    base = _read_json_artifact(store, layout.base_arc_prefix(sweep.sweep_id), "arc_scores.json")
    compiled["base_model_arc"] = None if base is None else {k: base[k] for k in ("acc", "acc_norm", "n")}
    prefix = layout.compiled_prefix(sweep.sweep_id)
    store.commit_bytes_artifact(prefix, {"compiled_results.json": json.dumps(compiled, indent=1).encode()},
                                meta=artifact_meta(sweep))
    return {"compiled": compiled, "n_cells": len(records), "missing_cells": missing, "artifact": store.uri(prefix)}


def run_heatmap(store: ObjectStore, sweep: Sweep) -> dict:
    """Draw the compiled results (PNG + PDF) and commit them. Returns {png (bytes), artifact, png_uri, pdf_uri,
    n_cells}; StepError when the compiled results are missing."""
    prefix = layout.compiled_prefix(sweep.sweep_id)
    require(store, prefix, "compiled results")
    compiled = json.loads(store.read_artifact_file(prefix, "compiled_results.json"))
    with tempfile.TemporaryDirectory() as tmp:
        png, pdf = Path(tmp) / "heatmap.png", Path(tmp) / "heatmap.pdf"
        report.plot_heatmap(compiled, png, pdf, title=f"{sweep.sweep_id}")
        png_bytes = png.read_bytes()
        out = layout.heatmap_prefix(sweep.sweep_id)
        store.commit_artifact(out, tmp, meta=artifact_meta(sweep))
    return {"png": png_bytes, "artifact": store.uri(out), "png_uri": store.uri(f"{out}/heatmap.png"),
            "pdf_uri": store.uri(f"{out}/heatmap.pdf"), "n_cells": compiled.get("n_cells")}
