"""`zlt export`: a sweep's shareable results copied out of the store into a directory (what results/ in the repo
holds): the compiled JSON and heatmap, the records of every finished cell and a sample of its completions. No
adapters, checkpoints or full completion sets (tens of MB per sweep). Every file is a committed artifact's file,
copied byte for byte (the compiled JSON names artifacts by store key only), so what a record says is kept as it
is: `arc_scores.json`'s `source` is the ARC file's path on the machine that ran it when a path was given
(ZLT_ARC_SOURCE), and `device` in the records names the GPU.

<out>/sweep.json, compiled_results.json, heatmap.png, heatmap.pdf, onpolicy_stats.json, base_arc_scores.json
<out>/cells/<cell>/train_run.json, completions_stats.json, completions_sample.jsonl, marker_rates.json,
                   arc_scores.json
"""
from __future__ import annotations

import json
from pathlib import Path

from ..core.protocol import Sweep
from ..storage import ObjectStore
from . import layout
from .common import StepError

SAMPLES_PER_PERSONA = 3  # completions kept per persona in the sample: a few KB per cell


def completions_sample(jsonl: bytes, per_persona: int) -> bytes:
    """The first `per_persona` completions of each persona, in file order (question order, then sample index)."""
    kept, seen = [], {}
    for line in jsonl.decode().split("\n"):  # not splitlines(): U+2028 and the like are text
        if not line.strip():
            continue
        persona = json.loads(line)["persona"]
        if seen.get(persona, 0) < per_persona:
            seen[persona] = seen.get(persona, 0) + 1
            kept.append(line + "\n")
    return "".join(kept).encode()


def target_problem(out: str | Path, sweep: Sweep) -> str | None:
    """Why `out` cannot take the export of `sweep`, or None: a new or empty directory, or an earlier export of
    the same sweep (updated in place; files beside it, such as a run log, are left alone). A directory holding
    another sweep's export, or anything else, is refused: files are written one by one over what is there, so
    two sweeps' records would mix."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        return "is not a directory"
    if not out.is_dir() or not any(out.iterdir()):
        return None
    marker = out / "sweep.json"
    if not marker.is_file():
        return "is not empty and holds no sweep export (no sweep.json): give a new or an empty directory"
    try:
        same = json.loads(marker.read_text()) == json.loads(sweep.to_json())
    except (OSError, ValueError):
        same = False
    return None if same else ("holds the export of another sweep (its sweep.json differs): give a new or an "
                              "empty directory")


def export_sweep(store: ObjectStore, sweep: Sweep, out: str | Path,
                 samples_per_persona: int = SAMPLES_PER_PERSONA) -> dict:
    """Write the sweep's results under `out` (layout in the module docstring); a cell contributes only its
    committed artifacts. Returns {"files": count, "bytes": total, "cells": cells with marker rates}. Raises
    StepError when the sweep has no compiled results (run `compiled_results` first), ValueError for
    samples_per_persona < 0."""
    if samples_per_persona < 0:
        raise ValueError(f"samples_per_persona={samples_per_persona}; expected >= 0")
    sid = sweep.sweep_id
    if not store.artifact_exists(layout.compiled_prefix(sid)):
        raise StepError(f"sweep {sid} has no compiled results in {store.where(layout.compiled_prefix(sid))}: "
                        "materialize compiled_results first (zlt run does)")
    out = Path(out)
    written: dict[str, int] = {}

    def put(rel: str, data: bytes) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written[rel] = len(data)

    def copy(prefix: str, name: str, rel: str) -> None:
        if store.artifact_exists(prefix):
            put(rel, store.read_artifact_file(prefix, name))

    put("sweep.json", sweep.to_json().encode())
    copy(layout.compiled_prefix(sid), "compiled_results.json", "compiled_results.json")
    copy(layout.heatmap_prefix(sid), "heatmap.png", "heatmap.png")
    copy(layout.heatmap_prefix(sid), "heatmap.pdf", "heatmap.pdf")
    copy(layout.onpolicy_prefix(sid), "stats.json", "onpolicy_stats.json")
    copy(layout.base_arc_prefix(sid), "arc_scores.json", "base_arc_scores.json")
    cells = 0
    for cell in sweep.cells():
        rel = f"cells/{cell.key}"
        copy(layout.cell_prefix(sid, cell, "adapter"), "train_run.json", f"{rel}/train_run.json")
        completions = layout.cell_prefix(sid, cell, "completions")
        if store.artifact_exists(completions):
            put(f"{rel}/completions_stats.json", store.read_artifact_file(completions, "stats.json"))
            put(f"{rel}/completions_sample.jsonl", completions_sample(
                store.read_artifact_file(completions, "completions.jsonl"), samples_per_persona))
        copy(layout.cell_prefix(sid, cell, "marker_rates"), "marker_rates.json", f"{rel}/marker_rates.json")
        copy(layout.cell_prefix(sid, cell, "arc_scores"), "arc_scores.json", f"{rel}/arc_scores.json")
        cells += f"{rel}/marker_rates.json" in written
    return {"files": len(written), "bytes": sum(written.values()), "cells": cells}
