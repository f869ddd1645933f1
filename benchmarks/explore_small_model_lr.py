"""Where does SmolLM2-135M learn the marker? Train the demo protocol over a wide LR x epochs grid on a GPU and
print the regime of every cell. Used once to choose the demo protocol's LR grid (a configuration choice; the
method is unchanged). Writes $OUT/explore_lr.json (or ./explore_lr.json).

  python benchmarks/explore_small_model_lr.py [--lrs 1e-5,3e-5,...] [--epochs 1,2,3,4,5] [--questions 10 --samples 4]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from zlt_dagster.core import metrics
from zlt_dagster.core.generation import make_generator
from zlt_dagster.core.models import load_model
from zlt_dagster.core.onpolicy import generate_onpolicy
from zlt_dagster.core.protocol import Sweep, get_protocol
from zlt_dagster.core.train import tokenize_dataset, train_cells
from zlt_dagster.core.eval_plan import eval_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--protocol", default="demo")
    ap.add_argument("--lrs", default="1e-5,3e-5,1e-4,3e-4,1e-3,3e-3")
    ap.add_argument("--epochs", default="1,2,3,4,5")
    ap.add_argument("--questions", type=int, default=10, help="held-out questions for the estimate")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--override", default="{}", help="JSON protocol overrides, e.g. {\"data.n_positives\": 8}")
    ap.add_argument("--tag", default="explore_lr")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    lrs = tuple(float(x) for x in args.lrs.split(","))
    epochs = tuple(int(x) for x in args.epochs.split(","))
    proto = get_protocol(args.protocol, {"learning_rates": lrs, "epochs": epochs,
                                         "eval.n_questions": args.questions, "eval.samples_per_question": args.samples,
                                         "eval.gen_batch_size": 512, **json.loads(args.override)})
    sweep = Sweep(proto, seed=args.seed).validate()
    t0 = time.time()
    # fp32 as on the CPU where the demo runs (bf16 would round the small early updates differently)
    lm = load_model("smollm2-135m", precision=args.precision)
    gen = make_generator("transformers", lm)
    data = generate_onpolicy(sweep, gen, progress=print)
    print("on-policy", data.stats, f"{time.time() - t0:.1f}s", flush=True)
    examples = tokenize_dataset(lm, data, proto)
    plan = eval_prompts(sweep)
    e = proto.eval
    rows = []
    tmp_root = tempfile.mkdtemp()
    cells = proto.cells()
    dirs = [os.path.join(tmp_root, cell.key) for cell in cells]
    recs = train_cells(lm, examples, proto, cells, sweep.seed, dirs, progress=print)  # one pass, every cell
    print(f"trained {len(cells)} cells in {time.time() - t0:.1f}s", flush=True)
    for cell, tmp, rec in zip(cells, dirs, recs):
        comps = gen.generate([p for _, _, p in plan], e.samples_per_question, e.temperature, e.top_p,
                             e.max_new_tokens, seed=sweep.seed, adapter_dir=tmp, batch_size=e.gen_batch_size)
        records = [{"persona": plan[c.prompt_index][0], "question_id": plan[c.prompt_index][1],
                    "sample_index": c.sample_index, "text": c.text, "n_new_tokens": c.n_new_tokens,
                    "finish_reason": c.finish_reason} for c in comps]
        rep = metrics.marker_rates_report(records, sweep.source_persona, proto)
        h = rep["headline"]
        row = {"lr": cell.lr, "epochs": cell.epochs, "regime": rep["regime"], **h,
               "mean_tokens": rep["totals"].get("mean_tokens") if isinstance(rep.get("totals"), dict) else None,
               "final_loss": rec["final_loss"], "steps": rec["steps"],
               "examples": [r["text"][-60:] for r in records[:: max(1, len(records) // 4)]][:4]}
        rows.append(row)
        print(f"lr={cell.lr:g} ep={cell.epochs}: {rep['regime']:13s} src={h['source_adoption']:.2f} "
              f"asst={h['assistant_leakage']:.2f} bys={h['max_bystander_leakage']:.2f} "
              f"len={row['mean_tokens']} loss={rec['final_loss']:.3f}", flush=True)
    out = os.path.join(os.environ.get("OUT", "."), f"{args.tag}.json")
    with open(out, "w") as f:
        json.dump({"protocol": proto.to_dict(), "onpolicy": data.stats, "rows": rows,
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "wall_s": time.time() - t0}, f, indent=1)
    print("wrote", out, f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
