"""One demo cell's evaluation on the CPU, before and after the fast paths, on the real SmolLM2-135M (fp32).

    python benchmarks/cpu_cell_bench.py [--repeats 3] [--out benchmarks/cpu_results.json]

Completions: the demo protocol's 66 (3 held-out questions x 11 personas x 2 samples, <= 32 new tokens, T=1.0)
with `transformers` (generate(), adapter attached through peft) vs `transformers-fast` (adapter merged into the
fp32 weights, one prefill per prompt shared by its samples, finished rows leave the batch).
ARC: the demo's 12 ARC-Challenge questions with the adapter attached and every choice a full sequence with logits
at every position (before) vs merged adapter, shared context, LM head at continuation positions only (after).
The adapter has the demo's LoRA shape with random B (speed does not depend on its values). Median of --repeats."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zlt_dagster.core import arc  # noqa: E402
from zlt_dagster.core.eval_plan import eval_prompts  # noqa: E402
from zlt_dagster.core.generation import make_generator  # noqa: E402
from zlt_dagster.core.generation.transformers_backend import applied_adapter, attached_adapter  # noqa: E402
from zlt_dagster.core.models import load_model  # noqa: E402
from zlt_dagster.core.protocol import Sweep, get_protocol  # noqa: E402
from zlt_dagster.core.random_adapter import save_random_adapter  # noqa: E402
from zlt_dagster.core.lora_bank import lora_config  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    walls, res = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls), res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/cpu_results.json")
    args = ap.parse_args()
    sweep = Sweep(get_protocol("demo"), base_model="smollm2-135m").validate()
    e = sweep.protocol.eval
    lm = load_model("smollm2-135m", device="cpu")
    prompts = [p for _, _, p in eval_prompts(sweep)]
    questions = arc.load_arc(None, limit=e.arc_limit)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats,
              "model": "smollm2-135m fp32", "completions_per_cell": len(prompts) * e.samples_per_question,
              "arc_questions": len(questions)}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = save_random_adapter(lm.model, lora_config(sweep.protocol), Path(tmp) / "adapter", b_std=0.01)
        for backend in ("transformers", "transformers-fast"):
            gen = make_generator(backend, lm)
            wall, comps = timed(lambda: gen.generate(prompts, e.samples_per_question, e.temperature, e.top_p,
                                                     e.max_new_tokens, seed=42, adapter_dir=adapter,
                                                     batch_size=e.gen_batch_size), args.repeats)
            new = sum(c.n_new_tokens for c in comps)
            result[f"completions_{backend}"] = {"wall_s": round(wall, 2), "new_tokens": new,
                                                "new_tokens_per_s": round(new / wall, 1)}
            print(backend, result[f"completions_{backend}"], flush=True)

        def arc_before():
            prefix = arc.bos_prefix(lm.tokenizer)
            pairs = [arc.encode_pair(lm.tokenizer, arc.arc_context(q.question), f" {c}", prefix)
                     for q in questions for c in q.choices]
            with attached_adapter(lm.model, adapter) as model:
                return arc.sequence_loglikelihoods(model, pairs, batch_size=e.arc_batch_size,
                                                   pad_id=lm.tokenizer.pad_token_id or 0, full_logits=True)

        def arc_after():
            with applied_adapter(lm, adapter) as model:
                return arc.score_arc(model, lm.tokenizer, questions, batch_size=e.arc_batch_size)

        w_before, lls = timed(arc_before, args.repeats)
        w_after, res = timed(arc_after, args.repeats)
        after_lls = [ll for p in res["predictions"] for ll in p["lls"]]
        result["arc_before"] = {"wall_s": round(w_before, 2), "how": "attached adapter, full sequences, all logits"}
        result["arc_after"] = {"wall_s": round(w_after, 2), "how": "merged adapter, shared context, head-only",
                               "max_abs_ll_diff_vs_before": max(abs(a - b) for a, b in zip(lls, after_lls))}
        print("arc", result["arc_before"], result["arc_after"], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
