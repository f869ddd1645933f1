"""Generation on the GPU, naive and fast side by side in ONE run (issue 17): the pipeline's generators on the
paper protocol's workloads.

135m  SmolLM2-135M-Instruct, real weights (the kit's GGUF, de-quantised, bf16), the paper protocol's completions
      workload: 11 personas x 20 held-out questions x 10 samples = 2,200 completions, T=1.0, <= 512 new tokens,
      with a random LoRA of the protocol's shape whose B is small (b_std 1e-3: the model still answers like the
      base, so lengths are those of a non-degenerate cell).
        naive_hf         plain generate(), adapter attached, batch 64 (the eval protocol's old gen_batch_size)
        naive_fast       the pipeline's transformers path before issue 17: fast loop at batch 60 (64 rounded to
                         whole prompts)
        fast_static      the pipeline's path: static decode, CUDA graphs, decoder layers compiled (inductor),
                         attention by our Triton kernel (core/generation/decode_kernel.py)
        fast_static_flash  the same with ZLT_DECODE_ATTENTION=flash (torch's flash varlen kernel: the path before)
        fast_static_eager  the same with ZLT_DECODE_COMPILE=off
        fast_auto        the same loop, batch sized to the device (core/generation/batch_size.py): all rows at once
        vllm_seeded      the vLLM backend as the pipeline runs it (per-prompt seeds)
        vllm_unseeded    the same with ZLT_VLLM_SEEDED=0 (the sampler's per-request generator loop off)
      naive runs take a prefix of the prompts (rates, not totals); the vLLM engine's start-up is timed apart.
      Then the pipeline's own steps on a local store: `onpolicy_data` (steps.onpolicy.run_onpolicy, paper protocol:
      2,200 answers at T=0.7 <= 512 tokens, cut ones regenerated <= 1,024) and the base model's ARC
      (steps.arc.run_base_arc, 1,172 questions, batch sized to the device).
7b    Qwen2.5-7B shapes, random weights (transformers: built on the GPU; vLLM: load_format="dummy"), a random LoRA
      r=32 all-linear, the same 2,200 x <= 512 workload (random weights rarely stop: every row runs to 512).
        naive_fast       fast loop at batch 1,100 (the best transformers figure, issue 6), <= 64 new tokens
        vllm_seeded / vllm_unseeded

Timing: CUDA-synchronised wall clock around the whole call, after a warm-up call of the same path.
  . /root/kit/env.sh && PYTHONPATH=$PWD:$PYTHONPATH GIT_COMMIT=<sha> python3 benchmarks/gen_bench.py --only 135m --out $OUT/g135
Writes results.json and bench.log to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from gpu_bench import LOG, Runner, T0, build_model, kernel_table, log, peak_gib, reset_peak, sync  # noqa: E402 (benchmarks/)

from zlt_dagster.core.eval_plan import eval_prompts  # noqa: E402
from zlt_dagster.core.generation.progress import GenerationProgress  # noqa: E402
from zlt_dagster.core.generation.transformers_backend import TransformersGenerator  # noqa: E402
from zlt_dagster.core.generation.batch_size import requested  # noqa: E402
from zlt_dagster.core.generation import static_decode  # noqa: E402
from zlt_dagster.core.generation.static_attention import ATTENTION_ENV  # noqa: E402
from zlt_dagster.core.lora_bank import lora_config  # noqa: E402
from zlt_dagster.core.protocol import PAPER, Sweep  # noqa: E402
from zlt_dagster.core.random_adapter import save_random_adapter  # noqa: E402

COMPILE_ENV = "ZLT_DECODE_COMPILE"  # off = the static decode's layers eager (the lever of the third session)
SWEEP = Sweep(protocol=PAPER, base_model="smollm2-135m", source_persona="villain", seed=42)
ENGINE_OVERRIDES: dict = {}  # --vllm-engine: extra LLM(...) arguments for the 135M engine (JSON)
SMOKE = "--smoke" in sys.argv  # CPU dry run: tiny model, tiny lengths; checks the script, not speed
NO_VLLM = "--no-vllm" in sys.argv  # the GPU machine without vLLM landed (../shared/tools/gpu-kit alone)
PROFILE = "--profile" in sys.argv
if SMOKE:
    SWEEP = dataclasses.replace(SWEEP, base_model="tiny")


def summary(comps, wall: float, **extra) -> dict:
    new = sum(c.n_new_tokens for c in comps)
    lengths = sorted(c.n_new_tokens for c in comps)
    return {"tok_s": round(new / wall, 1), "wall_s": round(wall, 2), "samples": len(comps), "new_tokens": new,
            "mean_tokens": round(new / max(1, len(comps)), 1), "median_tokens": lengths[len(lengths) // 2],
            "stopped": sum(c.finish_reason == "stop" for c in comps), **extra}


def warm_up(gen, prompts, adapter, batch: int) -> float:
    """Two short calls of 20 and 30 rows before the clock: CUDA graphs, and on the compiled static decode
    (ZLT_DECODE_COMPILE) the compile of the decoder layers, which turn the row count symbolic when they see it
    change (sampling.sample_new_tokens). Seconds spent (compiling included: once per process in the pipeline)."""
    t = time.perf_counter()
    for n in (2, 3):
        gen.generate(prompts[:n], 10, 1.0, 1.0, 4, seed=1, adapter_dir=adapter, batch_size=batch)
    return round(time.perf_counter() - t, 2)


def bench_transformers(lm, prompts, adapter, n_prompts: int, max_new: int, batch: int, loop: str, merge: bool,
                       decode: str = "auto"):
    gen = TransformersGenerator(lm, merge_adapter=merge, loop=loop, decode=decode)
    ps = prompts[:n_prompts]
    warm_s = warm_up(gen, ps, adapter, batch)
    reset_peak(lm.device)
    sync(lm.device)
    bar = GenerationProgress(log, f"{loop} b{batch or 'auto'}", len(ps) * 10)
    before = captures()
    t = time.perf_counter()
    comps = gen.generate(ps, 10, 1.0, 1.0, max_new, seed=0, adapter_dir=adapter, batch_size=batch, progress=bar)
    sync(lm.device)
    return summary(comps, time.perf_counter() - t, **captures(before), batch=bar.batch_size, batch_source=bar.batch_source, loop=loop,
                   decode=gen.decode_path, merged=merge, prompts=len(ps), max_new_tokens=max_new,
                   peak_gib=peak_gib(lm.device), warm_up_s=warm_s)


def captures(before: dict | None = None) -> dict:
    """The static decode's CUDA graph captures so far (static_decode.CAPTURES), or since `before`: graphs and host
    seconds spent capturing (empty for a tree without the counter: --tag runs of older commits)."""
    totals = getattr(static_decode, "CAPTURES", None)
    if totals is None:
        return {}
    now = {"graph_captures": totals.graphs, "capture_s": totals.seconds}
    if before:
        now = {k: v - before.get(k, 0) for k, v in now.items()}
    return {k: round(v, 3) for k, v in now.items()}


def with_env(env: dict, fn, *args, **kw):
    """fn(*args, **kw) with the environment variables `env` set for the call (a lever switched off in-process)."""
    with mock.patch.dict(os.environ, env):
        return fn(*args, **kw)


def decode_profile(lm, prompts, adapter, decode: str, max_new: int, out: Path, tag: str) -> dict:
    """GPU kernels only (CUPTI activity: kernels replayed inside CUDA graphs are listed too) over one fast-loop
    generation of every prompt x 10 samples, <= max_new tokens, after a warm-up: kernel time / wall (GPU busy; far
    under 1 = the host is the bottleneck), kernels per decode step and the largest kernels (table written to
    --out as profile_decode_<tag>.txt)."""
    from torch.profiler import ProfilerActivity, profile

    gen = TransformersGenerator(lm, loop="fast", decode=decode)
    warm_up(gen, prompts, adapter, 0)
    sync(lm.device)
    acts = [ProfilerActivity.CUDA] if lm.device.type == "cuda" else [ProfilerActivity.CPU]  # CPU: the smoke run
    before = captures()
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        comps = gen.generate(prompts, 10, 1.0, 1.0, max_new, seed=0, adapter_dir=adapter, batch_size=0)
        sync(lm.device)
        wall = time.perf_counter() - t
    caught = captures(before)
    busy_ms, launches, lines = kernel_table(prof)
    steps = max(c.n_new_tokens for c in comps)
    head = (f"decode={gen.decode_path}: {len(comps)} rows, {steps} steps, wall {wall * 1e3:.1f} ms "
            f"({wall * 1e3 / steps:.2f} ms a step), kernel time {busy_ms:.1f} ms (GPU busy {busy_ms / wall / 1e3:.0%}), "
            f"{launches / steps:.0f} kernels a step\n")
    (out / f"profile_decode_{tag}.txt").write_text(head + "\n".join(lines) + "\n")
    return {"decode": gen.decode_path, "rows": len(comps), "steps": steps, "wall_ms": round(wall * 1e3, 1),
            "ms_per_step": round(wall * 1e3 / steps, 2), "kernel_ms": round(busy_ms, 1),
            "gpu_busy_fraction": round(busy_ms / wall / 1e3, 3), "kernels_per_step": round(launches / steps),
            "tok_s": round(sum(c.n_new_tokens for c in comps) / wall, 1), **caught, "top": lines[:10]}


def vllm_engine(lm, **overrides):
    from zlt_dagster.core.generation.vllm_backend import VllmGenerator

    t = time.perf_counter()
    gen = VllmGenerator(lm, lora_rank=PAPER.lora.r, **overrides)
    return gen, round(time.perf_counter() - t, 1)


def bench_vllm(gen, prompts, adapter, max_new: int, seeded: bool, start_s: float | None = None):
    gen.seeded = seeded
    gen.generate(prompts[:2], 10, 1.0, 1.0, 4, seed=1, adapter_dir=adapter)  # warm-up: adapter load, graphs
    torch.cuda.synchronize()
    bar = GenerationProgress(log, f"vllm seeded={seeded}", len(prompts) * 10)
    t = time.perf_counter()
    comps = gen.generate(prompts, 10, 1.0, 1.0, max_new, seed=0, adapter_dir=adapter, progress=bar)
    torch.cuda.synchronize()
    cfg = gen.llm.llm_engine.vllm_config
    return summary(comps, time.perf_counter() - t, seeded=seeded, engine_start_s=start_s, max_new_tokens=max_new,
                   max_num_seqs=cfg.scheduler_config.max_num_seqs,
                   cudagraph_max=cfg.compilation_config.max_cudagraph_capture_size,
                   engine_args={k: str(v) for k, v in gen.engine_args.items()})


def first_tokens_agree(gen, lm, prompts, adapter) -> dict:
    """Greedy: vLLM's first 16 tokens vs the transformers plain path's, per prompt (bf16 both; a share, not an
    assertion: bf16 kernels differ and a near-tie can flip)."""
    t = TransformersGenerator(lm).generate(prompts[:20], 1, 1e-5, 1.0, 16, seed=0, adapter_dir=adapter)
    v = gen.generate(prompts[:20], 1, 1e-5, 1.0, 16, seed=0, adapter_dir=adapter)
    same = sum(a.text == b.text for a, b in zip(t, v))
    return {"prompts": len(t), "identical_first_16_tokens": same, "examples": [[a.text, b.text] for a, b in
                                                                               zip(t[:2], v[:2])]}


def static_vs_dynamic_greedy(lm, prompts, adapter, n_new: int = 32) -> dict:
    """Greedy (temperature 0): the static decode's first n_new tokens vs the DynamicCache loop's, per prompt, both
    in the model's dtype (a share, not an assertion: different attention kernels, a bf16 near-tie can flip; the
    CPU tests assert equality in fp32)."""
    outs = [TransformersGenerator(lm, loop="fast", decode=d).generate(prompts[:40], 1, 0.0, 1.0, n_new, seed=0,
                                                                      adapter_dir=adapter, batch_size=0)
            for d in ("auto", "dynamic")]
    same = sum(a.text == b.text for a, b in zip(*outs))
    return {"prompts": len(outs[0]), f"identical_first_{n_new}_tokens": same,
            "decode": TransformersGenerator(lm, loop="fast").decode_path}


def run_135m(R: Runner, tmp: Path) -> None:
    from zlt_dagster.steps.arc import run_base_arc
    from zlt_dagster.steps.common import ComputeSettings, model
    from zlt_dagster.steps.onpolicy import run_onpolicy
    from zlt_dagster.storage.local import LocalStore

    compute = ComputeSettings(device="cpu" if SMOKE else "cuda", generation_backend="vllm",
                              arc_source="sample" if SMOKE else os.environ.get("ZLT_ARC_SOURCE", ""))
    if SMOKE:
        compute = dataclasses.replace(compute, generation_backend="transformers-fast")
    t = time.perf_counter()
    lm = model(SWEEP, compute)
    R.results["workloads"]["load_135m"] = {"wall_s": round(time.perf_counter() - t, 1), "source": lm.source,
                                           "dtype": str(lm.dtype)}
    prompts = [p for _, _, p in eval_prompts(SWEEP)]
    adapter = save_random_adapter(lm.model, lora_config(PAPER), tmp / "a135", b_std=1e-3)
    auto = requested("eval.gen_batch_size", 0, lm.device)
    n_new = 8 if SMOKE else 512
    box = {}

    def start():
        box["gen"], s = vllm_engine(lm, **ENGINE_OVERRIDES)
        return {"engine_start_s": s, "overrides": ENGINE_OVERRIDES}
    # vLLM first where it is landed (--no-vllm: not). The naive paths take one batch each (64 rows took 28 s at
    # <= 512 tokens): rates.
    if not NO_VLLM:
        R.run("vllm_135m_engine", 200, start)
    if "gen" in box:
        gen = box["gen"]
        start_s = R.results["workloads"]["vllm_135m_engine"]["engine_start_s"]
        R.run("gen_135m_vllm_seeded", 60, bench_vllm, gen, prompts, adapter, n_new, True, start_s)
        R.run("gen_135m_vllm_unseeded", 60, bench_vllm, gen, prompts, adapter, n_new, False, start_s)
        R.run("greedy_135m_vllm_vs_hf", 30, first_tokens_agree, gen, lm, prompts, adapter)
        gen.seeded = True
    everything = len(prompts)
    # the pipeline's transformers path now (static decode, CUDA graphs), then the levers apart, then before
    R.run("gen_135m_fast_static", 40, bench_transformers, lm, prompts, adapter, everything, n_new, auto.rows,
          "fast", False, "auto")
    R.run("gen_135m_fast_static_flash", 40, with_env, {ATTENTION_ENV: "flash"}, bench_transformers, lm, prompts,
          adapter, everything, n_new, auto.rows, "fast", False, "auto")  # the attention kernel before
    R.run("gen_135m_fast_static_again", 40, bench_transformers, lm, prompts, adapter, everything, n_new, auto.rows,
          "fast", False, "auto")  # the pipeline's path once more: the spread between runs
    R.run("gen_135m_fast_static_eager", 40, with_env, {COMPILE_ENV: "off"}, bench_transformers, lm, prompts,
          adapter, everything, n_new, auto.rows, "fast", False, "auto")  # the static path, layers not compiled
    R.run("gen_135m_fast_static_sdpa", 60, with_env, {ATTENTION_ENV: "sdpa"}, bench_transformers, lm, prompts,
          adapter, everything, n_new, auto.rows, "fast", False, "auto")  # the static path with SDPA attention
    R.run("gen_135m_fast_auto", 70, bench_transformers, lm, prompts, adapter, everything, n_new, auto.rows,
          "fast", False, "dynamic")  # the pipeline's path before: DynamicCache, all rows at once
    R.run("gen_135m_naive_hf_b64", 40, bench_transformers, lm, prompts, adapter, 6, n_new, 64, "hf", False)
    R.run("gen_135m_naive_fast_b60", 40, bench_transformers, lm, prompts, adapter, 6, n_new, 60, "fast", False,
          "dynamic")
    def compile_again():
        """The compiled decode's warm-up after torch._dynamo.reset(): dynamo traces again, inductor's on-disk caches
        (FX graph, AOTAutograd, Triton) are warm: what a new process on this machine pays (the first warm-up above
        is the cold figure)."""
        torch._dynamo.reset()
        gen = TransformersGenerator(lm, loop="fast", decode="auto")
        return {"warm_up_s": warm_up(gen, prompts, adapter, auto.rows), "decode": gen.decode_path}
    R.run("decode_compile_warm_cache", 60, compile_again)
    R.run("greedy_135m_static_vs_dynamic", 30, static_vs_dynamic_greedy, lm, prompts, adapter, 8 if SMOKE else 32)
    if PROFILE:
        for tag, decode, env in (("135m_static", "auto", {}), ("135m_static_flash", "auto", {ATTENTION_ENV: "flash"}),
                                 ("135m_static_eager", "auto", {COMPILE_ENV: "off"}),
                                 ("135m_dynamic", "dynamic", {})):
            R.run(f"profile_decode_{tag}", 40, with_env, env, decode_profile, lm, prompts, adapter, decode,
                  8 if SMOKE else 64, R.out, tag)
    store = LocalStore(tmp / "store")

    def onpolicy(backend: str):
        c = dataclasses.replace(compute, generation_backend=backend)
        t = time.perf_counter()
        res = run_onpolicy(store, dataclasses.replace(SWEEP, name=f"bench-{backend}"), c, log=log)
        return {"wall_s": round(time.perf_counter() - t, 1),
                **{k: res.get(k) for k in ("kept", "new_tokens", "tokens_per_s", "gen_batch_size",
                                           "gen_batch_size_source", "generation_passes", "dropped_cut",
                                           "mean_answer_tokens")}}
    if not SMOKE:  # the paper protocol's 2,200 answers take minutes on a CPU
        R.run("onpolicy_135m_paper_fast_auto", 60, onpolicy, "transformers-fast")
    R.run("onpolicy_135m_paper_vllm", 90, onpolicy, "transformers-fast" if SMOKE or NO_VLLM else "vllm")

    def arc():
        t = time.perf_counter()
        res = run_base_arc(store, dataclasses.replace(SWEEP, name="bench-arc"), compute, log=log)
        return {"wall_s": round(time.perf_counter() - t, 1),
                **{k: res.get(k) for k in ("acc", "acc_norm", "n", "arc_batch_size", "continuations_per_s")}}
    R.run("arc_135m_base", 90, arc)


def run_7b(R: Runner, tmp: Path) -> None:
    device = torch.device("cuda")
    lm = build_model("7b", device, torch.bfloat16)
    adapter = save_random_adapter(lm.model, lora_config(PAPER), tmp / "a7b", b_std=1e-3)
    prompts = [p for _, _, p in eval_prompts(SWEEP)]
    R.run("gen_7b_fast_static", 120, bench_transformers, lm, prompts, adapter, len(prompts), 512, 0, "fast", False,
          "auto")
    R.run("gen_7b_fast_static_flash", 120, with_env, {ATTENTION_ENV: "flash"}, bench_transformers, lm, prompts,
          adapter, len(prompts), 512, 0, "fast", False, "auto")
    R.run("gen_7b_fast_static_sdpa", 120, with_env, {ATTENTION_ENV: "sdpa"}, bench_transformers, lm, prompts, adapter,
          len(prompts), 512, 0, "fast", False, "auto")
    R.run("gen_7b_naive_fast_b1100", 60, bench_transformers, lm, prompts, adapter, 110, 64, 1100, "fast", False,
          "dynamic")
    R.run("greedy_7b_static_vs_dynamic", 30, static_vs_dynamic_greedy, lm, prompts, adapter)
    if PROFILE:
        for tag, decode in (("7b_static", "auto"), ("7b_dynamic", "dynamic")):
            R.run(f"profile_decode_{tag}", 60, decode_profile, lm, prompts[:110], adapter, decode, 32, R.out, tag)
    if NO_VLLM:
        return
    # vLLM reads config + tokenizer from a directory and draws random weights itself (load_format="dummy")
    d = tmp / "qwen7b-shape"
    lm.model.config.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    lm7 = dataclasses.replace(lm, source=str(d))
    box = {}

    def start():
        box["gen"], s = vllm_engine(lm7, load_format="dummy")
        return {"engine_start_s": s}
    R.run("vllm_7b_engine", 240, start)
    if "gen" in box:
        R.run("gen_7b_vllm_seeded", 150, bench_vllm, box["gen"], prompts, adapter, 512, True)
        R.run("gen_7b_vllm_unseeded", 150, bench_vllm, box["gen"], prompts, adapter, 512, False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks")
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--only", choices=["135m", "7b"], required=True)
    ap.add_argument("--skip", default="", help="comma-separated workload names not to run (measured in a call before)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run with the tiny model (135m workloads only)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM workloads (vLLM not landed)")
    ap.add_argument("--profile", action="store_true", help="kernel profiles of the decode step, static and dynamic "
                    "(profile_decode_*.txt in --out)")
    ap.add_argument("--vllm-engine", default="{}", help='extra LLM(...) arguments as JSON, e.g. '
                    '\'{"max_num_seqs": 1024, "compilation_config": {"max_cudagraph_capture_size": 1024}}\'')
    a = ap.parse_args()
    ENGINE_OVERRIDES.update(json.loads(a.vllm_engine))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers
    results = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "commit": os.environ.get("GIT_COMMIT", "unknown"),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "python": sys.version.split()[0]}, "workloads": {}}
    try:
        import vllm
        results["versions"]["vllm"] = vllm.__version__
    except Exception as e:  # recorded: the transformers workloads still run
        results["versions"]["vllm"] = f"import failed: {type(e).__name__}: {e}"
    R = Runner(out, a.budget_s, results)
    skip = set(a.skip.split(",")) if a.skip else set()
    run = R.run
    R.run = lambda name, *args, **kw: None if name in skip else run(name, *args, **kw)  # --skip: measured already
    with tempfile.TemporaryDirectory(prefix="zlt-genbench-") as tmp:
        (run_135m if a.only == "135m" else run_7b)(R, Path(tmp))
    results["wall_s"] = round(time.perf_counter() - T0, 1)
    R.save()
    (out / "bench.log").write_text("\n".join(LOG))
    log("DONE")


if __name__ == "__main__":  # vLLM's engine process is spawned: it re-imports this module
    main()
