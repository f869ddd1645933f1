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
An artifact exists only once its MANIFEST.json (written last) does.
"""
from __future__ import annotations

from .core.protocol import Cell

CELL_ARTIFACTS = ("adapter", "completions", "marker_rates", "arc_scores")


def sweep_prefix(sweep_id: str) -> str:
    return f"sweeps/{sweep_id}"


def sweep_config_key(sweep_id: str) -> str:
    return f"{sweep_prefix(sweep_id)}/sweep.json"


def onpolicy_prefix(sweep_id: str) -> str:
    return f"{sweep_prefix(sweep_id)}/onpolicy"


def cell_prefix(sweep_id: str, cell: Cell, artifact: str) -> str:
    if artifact not in CELL_ARTIFACTS:
        raise ValueError(f"unknown cell artifact {artifact!r}; expected one of {CELL_ARTIFACTS}")
    return f"{sweep_prefix(sweep_id)}/cells/{cell.key}/{artifact}"


def base_arc_prefix(sweep_id: str) -> str:
    return f"{sweep_prefix(sweep_id)}/base_arc"


def compiled_prefix(sweep_id: str) -> str:
    return f"{sweep_prefix(sweep_id)}/compiled"


def heatmap_prefix(sweep_id: str) -> str:
    return f"{sweep_prefix(sweep_id)}/heatmap"
