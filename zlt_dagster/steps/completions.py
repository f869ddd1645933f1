"""Step `completions`: every persona x held-out question x samples, with the cell's adapter, kept as JSONL."""
from __future__ import annotations

import json
import tempfile
import time

from ..core.eval_plan import eval_prompts
from ..core.generation import make_generator
from ..core.generation.batch_size import requested
from ..core.protocol import Cell, Sweep
from ..storage import ObjectStore
from . import layout
from .adapter import fetch_adapter
from .common import ComputeSettings, Log, artifact_meta, gpu_seconds, model, progress_meter, require, sync


def run_completions(store: ObjectStore, sweep: Sweep, cell: Cell, compute: ComputeSettings,
                    log: Log = print) -> dict:
    """Generate and commit the cell's completions.jsonl and stats.json; returns stats.json's fields + `artifact`,
    among them the batch size used (gen_batch_size: rows per batch; gen_batch_size_source: "protocol", "cpu
    default" or how it was sized). Logs progress lines to `log` (at most every compute.progress_interval_s)."""
    e = sweep.protocol.eval
    lm = model(sweep, compute)
    gen = make_generator(compute.generation_backend, lm, lora_rank=sweep.protocol.lora.r,
                         decode_compile=compute.decode_compile_for("completions"))
    plan = eval_prompts(sweep)
    batch = requested("eval.gen_batch_size", e.gen_batch_size, lm.device)
    with tempfile.TemporaryDirectory(dir=compute.work_dir or None) as tmp:
        adapter = fetch_adapter(store, sweep, cell, tmp)
        bar = progress_meter(compute, log, f"completions {cell.key}", len(plan) * e.samples_per_question,
                             batch.source)
        t0 = time.perf_counter()
        comps = gen.generate([p for _, _, p in plan], e.samples_per_question, e.temperature, e.top_p,
                             e.max_new_tokens, seed=sweep.seed, adapter_dir=adapter, batch_size=batch.rows,
                             progress=bar)
        sync(lm)
        wall = time.perf_counter() - t0
        progress = bar.finish(tokens=sum(c.n_new_tokens for c in comps), sequences=len(comps))
    records = [{"persona": plan[c.prompt_index][0], "question_id": plan[c.prompt_index][1],
                "sample_index": c.sample_index, "text": c.text, "n_new_tokens": c.n_new_tokens,
                "finish_reason": c.finish_reason} for c in comps]
    new_tokens = sum(r["n_new_tokens"] for r in records)
    stats = {"n_completions": len(records), "new_tokens": new_tokens, "wall_s": round(wall, 2),
             "gpu_s": gpu_seconds(lm, wall),
             "tokens_per_s": round(new_tokens / wall, 1) if wall else None, "backend": gen.name,
             "decode": gen.decode_path,
             "gen_batch_size": progress["batch_size"], "gen_batch_size_source": progress["batch_size_source"],
             "cut_at_limit": sum(r["finish_reason"] == "length" for r in records),
             "stop_token_ids": list(gen.stop_token_ids),
             "stop_tokens": [lm.tokenizer.convert_ids_to_tokens(i) for i in gen.stop_token_ids]}
    prefix = layout.cell_prefix(sweep.sweep_id, cell, "completions")
    store.commit_bytes_artifact(prefix, {
        "completions.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode(),
        "stats.json": json.dumps(stats, indent=1).encode(), "sweep.json": sweep.to_json().encode()},
        meta=artifact_meta(sweep, cell=cell.key))
    return {**stats, "artifact": store.uri(prefix)}


def load_completions(store: ObjectStore, sweep: Sweep, cell: Cell) -> list[dict]:
    """The cell's committed completions (one dict a line of completions.jsonl); StepError when missing."""
    prefix = layout.cell_prefix(sweep.sweep_id, cell, "completions")
    require(store, prefix, f"completions for {cell.key}")
    text = store.read_artifact_file(prefix, "completions.jsonl").decode()
    return [json.loads(line) for line in text.split("\n") if line.strip()]  # not splitlines(): U+2028 and the like are text
