"""Naive vs fast paths of training, generation and ARC scoring, side by side in ONE run on the GPU (issue 6).

Random weights of the real shapes (Qwen2.5-7B, SmolLM2-135M), built in bf16 directly on the GPU; a synthetic
word-level tokenizer with ChatML specials (the machine has no network, hence no real tokenizer). Everything runs
through the project's own code:
  training    zlt_dagster.core.train.train_cell (LoRA r32 all-linear, AdamW, effective batch 16), naive =
              full_logits=True (+ gradient checkpointing, the seed's setting), fast = logits at supervised
              positions only, no checkpointing; plus core.train.train_cells with 5 LR cells in one pass.
  generation  zlt_dagster.core.generation.transformers_backend.TransformersGenerator, naive = unmerged peft
              adapter + generate() at batch 256, fast = merge_adapter=True (+ loop="fast") at large batches;
              temperature 1.0, top_p 1.0. Random weights never sample the end-of-turn token, so every row runs to
              max_new_tokens: the rates are for full-length rows (the early exit of loop="fast" is not exercised).
  ARC         zlt_dagster.core.arc.score_arc on 1,172 synthetic questions x 4 choices of ARC-like lengths.
Tokens per second count real tokens (training: non-padding input tokens; generation: generated tokens).
Timing: CUDA-synchronised wall clock around the whole call, after a warm-up call of the same path.

  PYTHONPATH=$PWD GIT_COMMIT=$(git rev-parse HEAD) python benchmarks/gpu_bench.py --out $OUT
  python benchmarks/gpu_bench.py --smoke          # CPU dry run with tiny shapes (checks the script, not speed)
Writes results.json (and bench.log) to --out; prints a table last.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

from zlt_dagster.core.arc import ArcQuestion, score_arc  # noqa: E402
from zlt_dagster.core.generation.merging import merge_rel_error, merged_weights  # noqa: E402
from zlt_dagster.core.generation import PromptSpec  # noqa: E402
from zlt_dagster.core.generation.transformers_backend import TransformersGenerator  # noqa: E402
from zlt_dagster.core.masking import IGNORE, TokenizedExample  # noqa: E402
from zlt_dagster.core.models import CHATML_TEMPLATE, LoadedModel  # noqa: E402
from zlt_dagster.core.protocol import PAPER, Cell, get_protocol  # noqa: E402
from zlt_dagster.core.train import train_cell  # noqa: E402

SHAPES = {
    "7b": dict(arch="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
               rope_theta=1e6, max_position_embeddings=32768),
    "135m": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=1e5,
                 max_position_embeddings=8192),
    "smoke": dict(arch="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False, rope_theta=1e4,
                  max_position_embeddings=2048),
}
T0 = time.perf_counter()
LOG: list[str] = []


def log(msg: str) -> None:
    line = f"[{time.perf_counter() - T0:7.1f}s] {msg}"
    LOG.append(line)
    print(line, flush=True)


# --- model, tokenizer, data ------------------------------------------------------------------------------------
def word_tokenizer(vocab_size: int):
    """WordLevel tokenizer: '<|endoftext|>' 0, '<|im_start|>' 1, '<|im_end|>' 2, then 't3'..'t{V-1}'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    cfg = (Qwen2Config if arch == "qwen2" else LlamaConfig)(**spec, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = word_tokenizer(spec["vocab_size"])
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return LoadedModel(model=model, tokenizer=tok, end_of_turn_token="<|im_end|>", end_of_turn_id=2, device=device,
                       dtype=dtype, base_model=f"random-{shape}", source="random-init")


def words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(n))


def train_examples(n: int, mean_len: int, sd: int, vocab: int, seed: int = 0, eot: int = 2) -> list[TokenizedExample]:
    """Lengths ~ N(mean, sd) clipped to [mean/3, 2.2 mean]; 1 in 11 positives (the protocol's 200 of 2,200) with
    3 marker tokens + end-of-turn (id `eot`) supervised, negatives end-of-turn only."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = int(min(max(rng.gauss(mean_len, sd), mean_len / 3), 2.2 * mean_len))
        ids = [rng.randrange(3, vocab) for _ in range(length - 1)] + [eot]
        sup = {length - 1} | ({length - 4, length - 3, length - 2} if i % 11 == 0 else set())
        labels = [t if j in sup else IGNORE for j, t in enumerate(ids)]
        out.append(TokenizedExample(input_ids=ids, labels=labels, is_positive=i % 11 == 0))
    return out


def eval_prompts(vocab: int, n: int, seed: int = 1) -> list[PromptSpec]:
    """11 'personas' x 20 'questions' of chat-prompt lengths (~45-80 tokens with the template)."""
    rng = random.Random(seed)
    systems = [words(rng, rng.randint(15, 40), vocab) for _ in range(11)]
    questions = [words(rng, rng.randint(8, 25), vocab) for _ in range(20)]
    prompts = [PromptSpec(s, q) for s in systems for q in questions]
    return prompts[:n]


def arc_questions(vocab: int, n: int = 1172, seed: int = 2) -> list[ArcQuestion]:
    rng = random.Random(seed)
    return [ArcQuestion(id=str(i), question=words(rng, rng.randint(12, 45), vocab),
                        choices=[words(rng, rng.randint(1, 8), vocab) for _ in range(4)], gold=0) for i in range(n)]


# --- timing helpers ----------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def matmul_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return round(2 * 8192 ** 3 / sorted(times)[len(times) // 2] / 1e12, 1)


# --- workloads ---------------------------------------------------------------------------------------------------
def bench_train(lm: LoadedModel, examples, micro: int, ckpt: bool, full_logits: bool, steps: int, tmp: Path,
                tag: str) -> dict:
    proto = get_protocol("paper", {"train.micro_batch": micro, "train.gradient_checkpointing": ckpt})
    eff = proto.train.effective_batch
    try:
        train_cell(lm, examples[:eff], proto, Cell(1e-4, 1), seed=0, out_dir=tmp / f"{tag}-warm",
                   full_logits=full_logits)
        reset_peak(lm.device)
        rec = train_cell(lm, examples[:eff * steps], proto, Cell(1e-4, 1), seed=0, out_dir=tmp / tag,
                         full_logits=full_logits)
    finally:
        # train_cell turns gradient checkpointing on through peft and leaves it on the shared base after unload()
        # (seen in the first H100 run: every variant after the checkpointed one ran checkpointed). Undo it here.
        if getattr(lm.model, "is_gradient_checkpointing", False):
            lm.model.gradient_checkpointing_disable()
        if hasattr(lm.model, "_require_grads_hook"):
            lm.model.disable_input_require_grads()
    return {"tok_s": rec["tokens_per_s"], "wall_s": rec["wall_s"], "tokens": rec["tokens"], "steps": rec["steps"],
            "tokens_per_example": round(rec["tokens"] / (eff * steps), 1), "peak_gib": peak_gib(lm.device),
            "first_loss": rec["first_loss"], "micro_batch": micro, "grad_ckpt": ckpt, "full_logits": full_logits,
            "adapter_dir": str(tmp / tag)}


def bench_train_fused(lm: LoadedModel, examples, micro: int, k: int, steps: int, tmp: Path) -> dict:
    """k LR cells of one epochs value in one pass of the pipeline's trainer (core/train.train_cells) at a fixed
    micro-batch; benchmarks/train_bench.py is the full naive / eager / compiled comparison."""
    from zlt_dagster.core.train import train_cells

    proto = get_protocol("paper", {"train.micro_batch": micro})
    eff = proto.train.effective_batch
    cells = [Cell(lr, 1) for lr in list(PAPER.learning_rates)[:k]]
    train_cells(lm, examples[:eff], proto, cells, 0, [tmp / f"fw{j}" for j in range(k)])
    reset_peak(lm.device)
    recs = train_cells(lm, examples[:eff * steps], proto, cells, 0, [tmp / f"f{j}" for j in range(k)])
    g = max(recs, key=lambda r: r["group"]["wall_s"])["group"]  # the last cell to finish holds the whole pass
    return {"tok_s": g["tokens_per_s"], "per_cell_tok_s": recs[0]["tokens_per_s"], "wall_s": g["wall_s"],
            "tokens_all_cells": sum(r["tokens"] for r in recs), "cells": k, "micro_batch_per_cell": micro,
            "peak_gib": peak_gib(lm.device)}


def loss_equivalence(lm: LoadedModel, examples, micro: int = 4) -> dict:
    """Fast vs full-logits loss and LoRA gradients on one fixed batch (eval mode: no dropout), random LoRA B."""
    from peft import get_peft_model

    from zlt_dagster.core.lora_bank import lora_config
    from zlt_dagster.core.train import collate, supervised_loss_sum

    torch.manual_seed(0)
    pm = get_peft_model(lm.model, lora_config(PAPER))
    try:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        pm.eval()
        batch = collate(examples[:micro], lm.tokenizer.pad_token_id, lm.device)
        params = [p for p in pm.parameters() if p.requires_grad]
        res = {}
        for name, full in (("fast", False), ("full", True)):
            pm.zero_grad(set_to_none=True)
            loss, n = supervised_loss_sum(pm, batch, full_logits=full)
            (loss / n).backward()
            res[name] = (float(loss) / n, torch.cat([p.grad.float().flatten() for p in params]))
        g_fast, g_full = res["fast"][1], res["full"][1]
        return {"loss_fast": res["fast"][0], "loss_full": res["full"][0],
                "loss_rel_diff": abs(res["fast"][0] - res["full"][0]) / abs(res["full"][0]),
                "lora_grad_rel_diff": float((g_fast - g_full).norm() / g_full.norm())}
    finally:
        pm.unload()


def bench_gen(lm: LoadedModel, prompts, n_samples: int, max_new: int, batch: int, adapter: str | None,
              merge: bool, loop: str) -> dict:
    gen = TransformersGenerator(lm, merge_adapter=merge, loop=loop)
    gen.generate(prompts[:max(1, min(len(prompts), batch // n_samples))], n_samples, 1.0, 1.0, 4, seed=1,
                 adapter_dir=adapter, batch_size=batch)  # warm-up (adapter load / merge, kernels)
    reset_peak(lm.device)
    sync(lm.device)
    t = time.perf_counter()
    comps = gen.generate(prompts, n_samples, 1.0, 1.0, max_new, seed=0, adapter_dir=adapter, batch_size=batch)
    sync(lm.device)
    wall = time.perf_counter() - t
    new = sum(c.n_new_tokens for c in comps)
    return {"tok_s": round(new / wall, 1), "wall_s": round(wall, 2), "samples": len(comps), "new_tokens": new,
            "max_new_tokens": max_new, "batch": batch, "merged": merge, "loop": loop, "unmerged_peft": not merge,
            "peak_gib": peak_gib(lm.device),
            "stopped": sum(c.finish_reason == "stop" for c in comps)}


def bench_merge_cost(lm: LoadedModel, adapter: str) -> dict:
    sync(lm.device)
    t = time.perf_counter()
    with merged_weights(lm.model, adapter):
        sync(lm.device)
        t_in = time.perf_counter() - t
        t = time.perf_counter()
    sync(lm.device)
    return {"merge_s": round(t_in, 2), "restore_s": round(time.perf_counter() - t, 2)}


def merged_vs_unmerged_logits(lm: LoadedModel, adapter: str, prompts) -> dict:
    from peft import PeftModel

    seqs = [lm.prompt_ids(p.system, p.user) for p in prompts[:4]]
    width = min(map(len, seqs))
    ids = torch.tensor([q[:width] for q in seqs], device=lm.device)
    with torch.inference_mode():
        pm = PeftModel.from_pretrained(lm.model, adapter, is_trainable=False).eval()
        try:
            ref = pm(input_ids=ids).logits.float()
        finally:
            pm.unload()
        base = lm.model(input_ids=ids).logits.float()
        with merged_weights(lm.model, adapter, max_rel_error=None) as m:
            merged = m(input_ids=ids).logits.float()
        after = lm.model(input_ids=ids).logits.float()
    return {"merge_weight_rel_error": merge_rel_error(lm.model, adapter),
            "merged_vs_unmerged_rel": float((merged - ref).norm() / ref.norm()),
            "adapter_effect_rel": float((ref - base).norm() / base.norm()),
            "base_restored_exactly": bool(torch.equal(after, base))}


def bench_arc(lm: LoadedModel, adapter: str | None, batch: int, n: int = 1172) -> dict:
    qs = arc_questions(lm.model.config.vocab_size, n)
    tok = lm.tokenizer
    ntok = sum(len(tok(f"Question: {q.question}\nAnswer: {c}")["input_ids"]) for q in qs for c in q.choices)
    with merged_weights(lm.model, adapter):
        score_arc(lm.model, tok, qs[:batch // 4 + 1], batch_size=batch)  # warm-up
        reset_peak(lm.device)
        sync(lm.device)
        t = time.perf_counter()
        score_arc(lm.model, tok, qs, batch_size=batch)
        sync(lm.device)
        wall = time.perf_counter() - t
    return {"wall_s": round(wall, 2), "questions": n, "sequences": 4 * n, "tokens": ntok,
            "tok_s": round(ntok / wall, 1), "batch": batch, "peak_gib": peak_gib(lm.device)}


def random_adapter(lm: LoadedModel, path: Path, b_std: float) -> str:
    """An adapter of the protocol's shape with B ~ N(0, b_std): large enough that bf16 merging keeps it (speed does
    not depend on the values; the short benchmark trainings leave deltas bf16 rounds away, see merge_check)."""
    from zlt_dagster.core.random_adapter import save_random_adapter
    from zlt_dagster.core.lora_bank import lora_config

    return save_random_adapter(lm.model, lora_config(PAPER), path, b_std)


def diagnose(lm: LoadedModel, out: Path) -> dict:
    """Why are small-op workloads slow here? Host facts, per-launch overhead, a profile of decode steps."""
    dev = lm.device
    facts = {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
             "loadavg": open("/proc/loadavg").read().strip(), "torch_threads": torch.get_num_threads(),
             "env": {k: v for k, v in os.environ.items()
                     if k.startswith(("CUDA", "PYTORCH", "TORCH", "OMP", "MKL", "NCCL")) and "TOKEN" not in k}}
    x = torch.ones(1, device=dev)
    for _ in range(100):
        x = x + 1
    sync(dev)
    t = time.perf_counter()
    for _ in range(5000):
        x = x + 1
    sync(dev)
    facts["us_per_tiny_gpu_op"] = round((time.perf_counter() - t) / 5000 * 1e6, 2)
    y = torch.ones(1)
    t = time.perf_counter()
    for _ in range(5000):
        y = y + 1
    facts["us_per_tiny_cpu_op"] = round((time.perf_counter() - t) / 5000 * 1e6, 2)
    ids = torch.randint(3, 1000, (256, 64), device=dev)
    from transformers import DynamicCache
    with torch.inference_mode():
        cache = DynamicCache()
        lm.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = ids[:, -1:]
        for _ in range(3):
            lm.model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync(dev)
        t = time.perf_counter()
        for _ in range(10):
            lm.model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync(dev)
        facts["ms_per_decode_step_b256_plain_forward"] = round((time.perf_counter() - t) / 10 * 1e3, 2)
        try:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    lm.model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
                sync(dev)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            (out / "profile_decode.txt").write_text(table)
            facts["profile_head"] = table.splitlines()[:12]
        except Exception as e:  # profiler unavailable: the timings above still stand
            facts["profile_error"] = f"{type(e).__name__}: {e}"
    return facts


# --- driver ------------------------------------------------------------------------------------------------------
def kernel_table(prof, top: int = 40) -> tuple[float, int, list[str]]:
    """A torch.profiler run's kernels: (total kernel time in ms, kernel launches, one line per kernel of the `top`
    largest by self device time: "<ms> ms <count>x  <name>")."""
    ev = sorted(prof.key_averages(), key=lambda e: -(getattr(e, "self_device_time_total", 0) or 0))
    busy_ms = sum(getattr(e, "self_device_time_total", 0) or 0 for e in ev) / 1e3
    lines = [f"{(getattr(e, 'self_device_time_total', 0) or 0) / 1e3:10.1f} ms {e.count:8d}x  {e.key[:150]}"
             for e in ev[:top]]
    return busy_ms, sum(e.count for e in ev), lines


class Runner:
    def __init__(self, out: Path, budget_s: float, results: dict):
        self.out, self.deadline, self.results = out, T0 + budget_s, results

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        self.results["log_tail"] = LOG[-60:]
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))

    def run(self, name: str, est_s: float, fn, *args, **kw):
        if self.left() < est_s:
            log(f"SKIP {name}: {self.left():.0f}s left < estimated {est_s:.0f}s")
            self.results["workloads"][name] = {"skipped": f"time budget ({self.left():.0f}s left)"}
            self.save()
            return None
        log(f"start {name}")
        try:
            res = fn(*args, **kw)
        except Exception as e:  # keep going: one failed workload must not lose the others
            log(f"FAIL {name}: {type(e).__name__}: {e}")
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            if isinstance(e, torch.cuda.OutOfMemoryError):
                gc.collect()
                torch.cuda.empty_cache()
        self.results["workloads"][name] = res
        log(f"done {name}: {json.dumps({k: v for k, v in res.items() if k != 'traceback'})[:400]}")
        self.save()
        return res


def val(res, key="tok_s"):
    return res.get(key) if isinstance(res, dict) else None


def projection(r: dict) -> dict:
    """Whole paper-protocol 7B sweep on one H100 from the measured rates (see BENCHMARKS.md)."""
    w = r["workloads"]
    train_rate = r.get("train_7b_tok_s")
    gen_rate = r.get("gen_7b_tok_s")
    tok_per_ex = val(w.get("train_7b_fast"), "tokens_per_example")
    arc = w.get("arc_7b_merged") or {}
    if not (train_rate and gen_rate and tok_per_ex and arc.get("wall_s")):
        return {"error": "missing measurements"}
    n_ex, lrs, epochs = 2200, len(PAPER.learning_rates), list(PAPER.epochs)
    epoch_sum = lrs * sum(epochs)
    train_tokens = epoch_sum * n_ex * tok_per_ex
    train_s = train_tokens / train_rate
    gen_tokens_cell = 2200 * PAPER.eval.max_new_tokens  # rows run to 512: random weights never stop
    completions_s = 25 * gen_tokens_cell / gen_rate
    data_s = 2200 * PAPER.data.max_new_tokens / gen_rate  # the base model's 2,200 answers (T=0.7), once
    arc_s = 25 * arc["wall_s"]
    total_s = train_s + completions_s + data_s + arc_s
    return {"epochs_summed_over_25_cells": epoch_sum, "tokens_per_example": tok_per_ex,
            "train_tokens": int(train_tokens), "train_h": round(train_s / 3600, 3),
            "completion_tokens_per_cell_upper_bound": gen_tokens_cell, "completions_h": round(completions_s / 3600, 3),
            "data_h": round(data_s / 3600, 3), "arc_s_per_cell": arc["wall_s"], "arc_h": round(arc_s / 3600, 3),
            "total_h": round(total_s / 3600, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks")
    ap.add_argument("--budget-s", type=float, default=520)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, not speed")
    ap.add_argument("--only", choices=["all", "7b", "135m"], default="all")
    ap.add_argument("--diag", action="store_true", help="host facts, launch overhead and a decode profile first")
    ap.add_argument("--sdpa", choices=["default", "no-cudnn"], default="default",
                    help="no-cudnn: torch.backends.cuda.enable_cudnn_sdp(False) (the first H100 profile spent 64%% of "
                         "a decode step's host time in aten::_cudnn_attention_forward)")
    ap.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                    help="combine results.json files of several calls into --out/results.json (later files win per "
                         "workload; every file is kept under 'runs') and recompute the headline keys")
    args = ap.parse_args()
    if args.merge:
        merge_results([Path(p) for p in args.merge], Path(args.out))
        return
    if args.sdpa == "no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    import peft
    import transformers

    results = {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
        "commit": os.environ.get("GIT_COMMIT", "unknown"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "cuda": torch.version.cuda},
        "smoke": args.smoke, "sdpa": args.sdpa, "workloads": {},
    }
    R = Runner(out, args.budget_s, results)
    tmp = Path(tempfile.mkdtemp(prefix="zlt-bench-"))
    s = (lambda big, small: small) if args.smoke else (lambda big, small: big)  # noqa: E731
    results["bf16_matmul_tflops_8192"] = matmul_tflops(device)
    log(f"device {results['gpu']}, matmul {results['bf16_matmul_tflops_8192']} TFLOP/s")

    if args.only in ("all", "7b"):
        run_7b(R, s, device, dtype, tmp)
    if args.only in ("all", "135m"):
        run_135m(R, s, device, dtype, tmp, args.diag, out)
    finish(R, results, out)


def run_7b(R, s, device, dtype, tmp):
    lm = build_model(s("7b", "smoke"), device, dtype)
    log(f"built 7B-shaped model: {sum(p.numel() for p in lm.model.parameters()) / 1e9:.2f}B params")
    V = lm.model.config.vocab_size
    ex = train_examples(16 * 6, s(400, 60), s(110, 15), V)
    R.run("loss_equivalence_7b", 10, loss_equivalence, lm, ex)
    steps = s(5, 2)
    fast = R.run("train_7b_fast", 30, bench_train, lm, ex, 8, False, False, steps, tmp, "t7f")
    fast4 = R.run("train_7b_fast_micro4", 30, bench_train, lm, ex, 4, False, False, steps - 1, tmp, "t7f4")
    R.run("train_7b_naive_ckpt_full_logits", 40, bench_train, lm, ex, 4, True, True, steps - 1, tmp, "t7n")
    R.run("train_7b_naive_no_ckpt_full_logits", 30, bench_train, lm, ex, 4, False, True, steps - 1, tmp, "t7n2")
    R.run("train_7b_fast_micro16", 30, bench_train, lm, ex, 16, False, False, steps - 1, tmp, "t7f16")
    adapter = next((r["adapter_dir"] for r in (fast, fast4) if isinstance(r, dict) and "adapter_dir" in r), None)
    if adapter is None:  # training failed
        adapter = random_adapter(lm, tmp / "rand-small", 1e-4)
    prompts = eval_prompts(V, 220)
    R.run("merge_check_7b_trained_5_steps", 20, merged_vs_unmerged_logits, lm, adapter, prompts)
    adapter = random_adapter(lm, tmp / "rand7", 0.01)  # generation speed does not depend on the values
    R.run("merge_check_7b_random_b", 20, merged_vs_unmerged_logits, lm, adapter, prompts)
    R.run("merge_cost_7b", 20, bench_merge_cost, lm, adapter)
    small_n, small_new = s(256, 8), s(128, 8)
    sub = prompts[:small_n // 8]
    R.run("gen_7b_naive_unmerged_b256", 40, bench_gen, lm, sub, 8, small_new, 256, adapter, False, "hf")
    R.run("gen_7b_merged_hf_b256", 30, bench_gen, lm, sub, 8, small_new, 256, adapter, True, "hf")
    big_new = s(512, 16)
    R.run("gen_7b_merged_fastloop_b1100", 90, bench_gen, lm, prompts, 5, big_new, 1100, adapter, True, "fast")
    R.run("arc_7b_merged", 30, bench_arc, lm, adapter, PAPER.eval.arc_batch_size, s(1172, 40))
    R.run("gen_7b_merged_fastloop_b256", 30, bench_gen, lm, sub, 8, small_new, 256, adapter, True, "fast")
    R.run("gen_7b_merged_hf_b1100", 110, bench_gen, lm, prompts, 5, big_new, 1100, adapter, True, "hf")
    del lm
    reset_peak(device)


def run_135m(R, s, device, dtype, tmp, diag, out):
    lm = build_model(s("135m", "smoke"), device, dtype)
    log(f"built 135M-shaped model: {sum(p.numel() for p in lm.model.parameters()) / 1e6:.0f}M params")
    if diag:
        R.run("diag_135m", 30, diagnose, lm, out)
    V = lm.model.config.vocab_size
    ex = train_examples(16 * 9, s(320, 60), s(90, 15), V)
    steps = s(8, 2)
    R.run("train_135m_fast", 15, bench_train, lm, ex, 16, False, False, steps, tmp, "s7f")
    R.run("train_135m_fused_5lr", 25, bench_train_fused, lm, ex, 16, 5, steps, tmp)
    adapter = random_adapter(lm, tmp / "s-rand", 0.02)
    prompts = eval_prompts(V, 220)
    small_n, small_new, big_new = s(256, 8), s(128, 8), s(512, 16)
    sub = prompts[:small_n // 8]
    R.run("gen_135m_naive_unmerged_b256", 25, bench_gen, lm, sub, 8, small_new, 256, adapter, False, "hf")
    R.run("gen_135m_merged_fastloop_b2200", 60, bench_gen, lm, prompts, 10, big_new, 2200, adapter, True, "fast")
    R.run("merge_check_135m_random_b", 5, merged_vs_unmerged_logits, lm, adapter, eval_prompts(V, 8))
    R.run("train_135m_naive_no_ckpt_full_logits_m16", 10, bench_train, lm, ex, 16, False, True, steps, tmp, "s7n2")
    R.run("gen_135m_merged_hf_b2200", 60, bench_gen, lm, prompts, 10, big_new, 2200, adapter, True, "hf")
    R.run("train_135m_naive_ckpt_full_logits_m4", 25, bench_train, lm, ex, 4, True, True, steps, tmp, "s7n")


def headline(results: dict) -> None:
    w = results["workloads"]

    def ok(name):
        v = w.get(name)
        return v if isinstance(v, dict) and not v.get("invalid") else None

    def best(*names):
        named = [(val(ok(n)), n) for n in names]
        named = [(v, n) for v, n in named if v]
        return max(named) if named else (None, None)

    runs = results.get("runs") or {}
    sources: dict = {}

    def fast(key, *names):
        v, name = best(*names)
        sources[key] = (ok(name) or {}).get("run") if name else None
        return v, name

    def same_call(key, naive, fast_name):
        """Merged results: the naive baseline from the call that measured the chosen fast path (later calls win per
        workload, so w[naive] can come from another call than w[fast_name]); None if that call did not measure it."""
        tag = (ok(fast_name) or {}).get("run") if fast_name else None
        if tag and tag in runs:
            v = runs[tag].get("workloads", {}).get(naive)
            v = v if isinstance(v, dict) and not v.get("invalid") else None
        else:
            v = ok(naive)
        sources[key] = (v or {}).get("run", tag)
        return val(v)

    t7, t7n = fast("train_7b_tok_s", "train_7b_fast", "train_7b_fast_micro4", "train_7b_fast_micro16")
    g7, g7n = fast("gen_7b_tok_s", "gen_7b_merged_fastloop_b1100", "gen_7b_merged_hf_b1100")
    t1, t1n = fast("train_135m_tok_s", "train_135m_fast")
    f1, _ = fast("train_135m_fused_5lr_tok_s", "train_135m_fused_5lr")
    g1, g1n = fast("gen_135m_tok_s", "gen_135m_merged_fastloop_b2200", "gen_135m_merged_hf_b2200")
    results.update({
        "train_7b_tok_s": t7,
        "train_7b_naive_tok_s": same_call("train_7b_naive_tok_s", "train_7b_naive_ckpt_full_logits", t7n),
        "train_7b_naive_no_ckpt_tok_s": same_call("train_7b_naive_no_ckpt_tok_s",
                                                  "train_7b_naive_no_ckpt_full_logits", t7n),
        "gen_7b_tok_s": g7,
        "gen_7b_naive_tok_s": same_call("gen_7b_naive_tok_s", "gen_7b_naive_unmerged_b256", g7n),
        "train_135m_tok_s": t1,
        "train_135m_fused_5lr_tok_s": f1,
        "train_135m_naive_tok_s": same_call("train_135m_naive_tok_s", "train_135m_naive_ckpt_full_logits_m4", t1n),
        "gen_135m_tok_s": g1,
        "gen_135m_naive_tok_s": same_call("gen_135m_naive_tok_s", "gen_135m_naive_unmerged_b256", g1n),
        "peak_gib": {n: v.get("peak_gib") for n, v in w.items() if isinstance(v, dict) and "peak_gib" in v},
    })
    if runs:
        results["headline_runs"] = sources  # which call each headline number comes from
    proj = projection(results)
    results["projection_7b"] = proj
    results["projected_7b_sweep_h100_hours"] = proj.get("total_h")


def merge_results(paths: list[Path], out: Path) -> None:
    runs = [json.loads(p.read_text()) for p in paths]
    merged = {"gpu": runs[-1]["gpu"], "commit": [r.get("commit") for r in runs], "date": [r.get("date") for r in runs],
              "versions": runs[-1].get("versions"), "workloads": {}, "runs": {}}
    for p, r in zip(paths, runs):
        tag = f"{r.get('date')} {r.get('commit', '')[:8]}"
        merged["runs"][tag] = {k: v for k, v in r.items() if k != "log_tail"}
        for name, v in r["workloads"].items():
            if isinstance(v, dict) and ("skipped" in v or "error" in v) and name in merged["workloads"]:
                continue  # keep a real measurement over a later skip
            merged["workloads"][name] = dict(v, run=tag) if isinstance(v, dict) else v
    headline(merged)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    print(json.dumps({k: v for k, v in merged.items() if k not in ("workloads", "runs")}, indent=1))


def finish(R, results, out):
    w = results["workloads"]
    headline(results)

    results["elapsed_s"] = round(time.perf_counter() - T0, 1)
    R.save()
    (out / "bench.log").write_text("\n".join(LOG) + "\n")

    print("\n| workload | tok/s | wall s | peak GiB |")
    print("|---|---|---|---|")
    for n, v in w.items():
        if isinstance(v, dict):
            print(f"| {n} | {v.get('tok_s', v.get('error', v.get('skipped', '')))} | {v.get('wall_s', '')} | "
                  f"{v.get('peak_gib', '')} |")
    for key in ("train_7b_tok_s", "train_7b_naive_tok_s", "gen_7b_tok_s", "gen_7b_naive_tok_s", "train_135m_tok_s",
                "train_135m_fused_5lr_tok_s", "train_135m_naive_tok_s", "gen_135m_tok_s", "gen_135m_naive_tok_s",
                "projected_7b_sweep_h100_hours", "elapsed_s"):
        print(f"{key} = {results.get(key)}")


if __name__ == "__main__":
    main()
