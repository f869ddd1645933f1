"""Human-readable object-store keys. Every sweep owns one prefix, so sweeps never overwrite each other.

sweeps/<sweep_id>/sweep.json                               the sweep's full config (protocol included)
sweeps/<sweep_id>/onpolicy/                                data.jsonl, stats.json, sweep.json, MANIFEST.json
sweeps/<sweep_id>/cells/lr=5e-06_ep=20/adapter/            adapter_config.json, adapter_model.safetensors,
                                                           train_run.json, sweep.json, MANIFEST.json
sweeps/<sweep_id>/cells/lr=5e-06_ep=20/completions/        completions.jsonl, ...
sweeps/<sweep_id>/cells/lr=5e-06_ep=20/marker_rates/       marker_rates.json, ...
sweeps/<sweep_id>/cells/lr=5e-06_ep=20/arc_scores/         arc_scores.json, ...
sweeps/<sweep_id>/base_arc/                                ARC of the base model (the reference row)
sweeps/<sweep_id>/compiled/                                compiled_results.json
sweeps/<sweep_id>/heatmap/                                 heatmap.png, heatmap.pdf
sweeps/<sweep_id>/cells/lr=5e-06_ep=20/checkpoint/step-N/  training checkpoints (deleted once the adapter is committed)
comparisons/<follow-up>/                                   comparison.json, .png, .pdf (cell_comparison)
An artifact exists only once its MANIFEST.json (written last) does.
"""
from __future__ import annotations

from ..core.protocol import Cell

CELL_ARTIFACTS = ("adapter", "completions", "marker_rates", "arc_scores")


def sweep_prefix(sweep_id: str) -> str:
    return f"sweeps/{sweep_id}"


def sweep_config_key(sweep_id: str) -> str:
    return f"{sweep_prefix(sweep_id)}/sweep.json"


def _per_sweep(name: str):
    """The prefix function of a per-sweep artifact: sweep_id -> sweeps/<sweep_id>/<name>."""
    def prefix(sweep_id: str) -> str:
        return f"{sweep_prefix(sweep_id)}/{name}"
    prefix.__name__ = prefix.__qualname__ = f"{name}_prefix"
    return prefix


onpolicy_prefix = _per_sweep("onpolicy")
base_arc_prefix = _per_sweep("base_arc")
compiled_prefix = _per_sweep("compiled")
heatmap_prefix = _per_sweep("heatmap")


def cell_prefix(sweep_id: str, cell: Cell, artifact: str) -> str:
    if artifact not in CELL_ARTIFACTS:
        raise ValueError(f"unknown cell artifact {artifact!r}; expected one of {CELL_ARTIFACTS}")
    return f"{sweep_prefix(sweep_id)}/cells/{cell.key}/{artifact}"


def checkpoint_prefix(sweep_id: str, cell: Cell) -> str:
    """sweeps/<id>/cells/<cell>/checkpoint (each checkpoint is an artifact step-NNNNNNNN/ under it)."""
    return f"{sweep_prefix(sweep_id)}/cells/{cell.key}/checkpoint"


def training_lock_key(sweep_id: str, cell: Cell) -> str:
    """The lease one trainer of a cell holds (a second concurrent run of the cell waits for it)."""
    return f"{sweep_prefix(sweep_id)}/cells/{cell.key}/.train.lock"


def comparison_prefix(name: str) -> str:
    """comparisons/<follow-up file stem>: comparison.json, comparison.png, comparison.pdf."""
    return f"comparisons/{name}"
