"""The static decode's attention alone, its three paths side by side in ONE run (issue 17, fourth session): torch's
flash varlen kernel (the path before), our Triton kernel (core/generation/decode_kernel.py) over a sweep of its
launch shapes, and SDPA with a length mask, at the completions workload's shapes.

Per shape (SmolLM2-135M: 9 query heads over 3 KV heads, d 64; Qwen2.5-7B: 28 over 4, d 128), 2,200 rows (every
completion of a cell at once, as the pipeline decodes them) and a cache of 1,024 slots per row, row lengths drawn
uniformly in [L/2, 3L/2] for L in --lengths: the time of ONE call (one layer of one decode step), measured as a
CUDA graph of 30 calls replayed 20 times (the pipeline replays the attention inside its decode-step graph, so
Python launch costs do not count), CUDA events around the replays; the K/V bytes the call must read (sum of the
rows' lengths x kv_heads x d x 2 tensors x 2 bytes) over that time (effective GB/s; the H200's HBM3e is ~4.8
TB/s); and the largest difference from the SDPA path (bf16 outputs).

  . /root/kit/env.sh && PYTHONPATH=$PWD:$PYTHONPATH python3 benchmarks/decode_attention_bench.py --out $OUT/attn
  PYTHONPATH=$PWD:$PYTHONPATH python3 benchmarks/decode_attention_bench.py --check --out $OUT/check   # accuracy
  TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/decode_attention_bench.py --smoke   # CPU dry run of the script
Writes results.json to --out and prints one line per measurement.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

from zlt_dagster.core.generation import decode_kernel, static_attention

SHAPES = {"135m": (9, 3, 64), "7b": (28, 4, 128)}
CONFIGS = list(itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3)))  # BLOCK_N, num_warps, num_stages


def inputs(shape: str, rows: int, capacity: int, mean_len: int, device, dtype, seed: int = 0):
    heads, kv_heads, d = SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(seed)
    # rotary leaves the query strided as [rows, heads, 1, d] views of [rows, 1, heads, d]: the same here
    q = torch.randn(rows, 1, heads, d, generator=g, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(rows, capacity, kv_heads, d, generator=g, device=device, dtype=dtype)
    v = torch.randn(rows, capacity, kv_heads, d, generator=g, device=device, dtype=dtype)
    lo, hi = max(1, mean_len // 2), min(capacity, mean_len * 3 // 2)
    lengths = torch.randint(lo, hi + 1, (rows,), generator=g, device=device, dtype=torch.int32)
    return q, k, v, lengths


def time_call(fn, device, layers: int = 30, replays: int = 20) -> float:
    """Microseconds per call: `layers` calls captured in one CUDA graph, replayed (CPU: plain calls, once)."""
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()   # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (layers * replays)


def measure(shape: str, rows: int, capacity: int, mean_len: int, device, dtype, configs) -> list[dict]:
    q, k, v, lengths = inputs(shape, rows, capacity, mean_len, device, dtype)
    heads, kv_heads, d = SHAPES[shape]
    scale = d ** -0.5
    kv_bytes = int(lengths.sum()) * kv_heads * d * 2 * k.element_size()
    width = int(lengths.max())
    ref = static_attention._sdpa(q, k, v, static_attention.batch_for("sdpa", lengths, capacity, width), scale).float()
    base = {"shape": shape, "rows": rows, "capacity": capacity, "mean_len": mean_len, "kv_mb": round(kv_bytes / 1e6, 1)}
    out = []

    def record(path: str, fn, **extra):
        try:
            err = float((fn().float() - ref).abs().max())
            us = time_call(fn, device)
        except Exception as e:  # noqa: BLE001 - recorded: a launch shape that does not fit is a result of the sweep
            out.append({**base, "path": path, **extra, "error": f"{type(e).__name__}: {str(e)[:160]}"})
            print(json.dumps(out[-1]), flush=True)
            return
        out.append({**base, "path": path, **extra, "us": round(us, 1), "gb_s": round(kv_bytes / us / 1e3, 1),
                    "max_abs_diff_vs_sdpa": round(err, 5)})
        print(json.dumps(out[-1]), flush=True)

    if device.type == "cuda":
        # each call builds its DecodeBatch, as the pipeline's captured step does
        record("flash", lambda: static_attention._flash(
            q, k, v, static_attention.batch_for("flash", lengths, capacity, width), scale))
    record("sdpa", lambda: static_attention._sdpa(
        q, k, v, static_attention.batch_for("sdpa", lengths, capacity, width), scale))
    default = (decode_kernel.BLOCK_N, decode_kernel.NUM_WARPS, decode_kernel.NUM_STAGES)
    for block_n, warps, stages in configs:
        decode_kernel.BLOCK_N, decode_kernel.NUM_WARPS, decode_kernel.NUM_STAGES = block_n, warps, stages
        try:
            record("triton", lambda: decode_kernel.gqa_decode_attention(q, k, v, lengths, scale), block_n=block_n,
                   warps=warps, stages=stages, default=(block_n, warps, stages) == default)
        finally:
            decode_kernel.BLOCK_N, decode_kernel.NUM_WARPS, decode_kernel.NUM_STAGES = default
    return out


CHECK_LAYOUTS = [(9, 3, 64), (28, 4, 128), (6, 2, 8), (32, 1, 80), (8, 8, 256)]


def check(device) -> list[dict]:
    """Accuracy on the GPU, where Triton compiles what its CPU interpreter only emulates (dot precision, tile
    minimums): each path's largest difference from float64 attention of the same inputs, per dtype and head layout
    (5 rows, lengths 1 to 200 of 200 slots, values of std 3 so that logits spread), and the start-up probe's
    verdict (static_attention.triton_decode_check: what a decode of that layout would take)."""
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for heads, kv_heads, d in CHECK_LAYOUTS:
            g = torch.Generator(device=device).manual_seed(1)
            q = 3 * torch.randn(5, 1, heads, d, generator=g, device=device).transpose(1, 2)
            k = 3 * torch.randn(5, 200, kv_heads, d, generator=g, device=device)
            v = torch.randn(5, 200, kv_heads, d, generator=g, device=device)
            lengths = torch.tensor([1, 63, 64, 129, 200], device=device, dtype=torch.int32)
            qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
            group = heads // kv_heads  # the reference: float64 attention of the same (rounded) inputs
            keys = kd.double().repeat_interleave(group, dim=2)
            vals = vd.double().repeat_interleave(group, dim=2)
            w = torch.einsum("rhd,rnhd->rhn", qd[:, :, 0].double(), keys) * d ** -0.5
            w = w.masked_fill(torch.arange(200, device=device)[None, None, :] >= lengths[:, None, None], float("-inf"))
            ref = torch.einsum("rhn,rnhd->rhd", w.softmax(-1), vals)[:, None]
            row = {"dtype": str(dtype).replace("torch.", ""), "heads": heads, "kv_heads": kv_heads, "d": d,
                   "probe": static_attention.triton_decode_check(device, dtype, heads, kv_heads, d)}
            sdpa = static_attention._sdpa(qd, kd, vd, static_attention.batch_for("sdpa", lengths, 200, 200), d ** -0.5)
            row["sdpa_err"] = float((sdpa.double() - ref).abs().max())
            try:
                tri = decode_kernel.gqa_decode_attention(qd, kd, vd, lengths, d ** -0.5)
                row["triton_err"] = float((tri.double() - ref).abs().max())
            except Exception as e:  # noqa: BLE001 - recorded: a layout the kernel cannot compile is a result here
                row["triton_error"] = f"{type(e).__name__}: {str(e).splitlines()[-1][:160] if str(e) else ''}"
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks")
    ap.add_argument("--lengths", default="96,192,320,512")
    ap.add_argument("--shapes", default="135m,7b")
    ap.add_argument("--rows", type=int, default=2200)
    ap.add_argument("--sweep", action="store_true", help="every launch shape in CONFIGS (else the default only)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run: 6 rows, 80 slots, fp32 (TRITON_INTERPRET=1)")
    ap.add_argument("--check", action="store_true", help="accuracy against float64 per dtype and head layout "
                    "(CHECK_LAYOUTS), the probe's verdict; no timing")
    a = ap.parse_args()
    if a.smoke:  # the interpreter as the tests run it (NumPy >= 2.4, bf16 dots)
        from tests.core.attention_paths import mend_triton_interpreter
        mend_triton_interpreter(setattr)
    device = torch.device("cpu" if a.smoke else "cuda")
    dtype = torch.float32 if a.smoke else torch.bfloat16
    rows, capacity = (6, 80) if a.smoke else (a.rows, 1024)
    lengths = [40] if a.smoke else [int(x) for x in a.lengths.split(",")]
    configs = CONFIGS if a.sweep else [(decode_kernel.BLOCK_N, decode_kernel.NUM_WARPS, decode_kernel.NUM_STAGES)]
    results = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "commit": os.environ.get("GIT_COMMIT", "unknown"),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "versions": {"torch": torch.__version__, "python": sys.version.split()[0]}, "measurements": []}
    try:
        import triton
        results["versions"]["triton"] = triton.__version__
    except ImportError as e:
        results["versions"]["triton"] = f"import failed: {e}"
    if a.check:
        results["check"] = check(device)
    else:
        for shape in a.shapes.split(","):
            for mean_len in lengths:
                results["measurements"] += measure(shape, rows, capacity, mean_len, device, dtype, configs)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_attention.json").write_text(json.dumps(results, indent=1))
    failed = [m for m in results["measurements"] if "error" in m]
    if failed:  # recorded above; a launch shape the sweep cannot run still fails the run, loudly
        sys.exit(f"{len(failed)} measurement(s) failed, first: {failed[0]['path']} {failed[0]['error']}")


if __name__ == "__main__":
    main()
