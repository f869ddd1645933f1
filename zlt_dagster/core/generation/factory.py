"""Picks a generation backend by name: the only place that knows every backend."""
from __future__ import annotations

import importlib.util

from .base import BACKENDS, Generator
from .transformers_backend import TransformersGenerator
from .vllm_backend import VllmGenerator  # imports vllm itself only when a VllmGenerator is built

# `auto` takes vLLM for models of at least this many parameters. Measured on the H200 (BENCHMARKS.md, "Generation
# on the H200"; benchmarks/gen_h200/), the paper's completions workload (2,200 samples, <= 512 tokens, LoRA):
#   SmolLM2-135M  transformers fast loop, all 2,200 rows at once: 18.2k tok/s, 51 s a cell; vLLM 0.24 with CUDA
#                 graphs up to 1,024 rows: 25.8k, 35 s a cell, but its engine takes 128 s to start in every process,
#                 and production runs every step in its own pod: 163 s a cell there. In one process (`zlt run`)
#                 over 25 cells vLLM wins (128 + 25 x 35 = 1,003 s vs 1,275 s): `--backend vllm`.
#   Qwen2.5-7B    vLLM: 12.9k tok/s (graphs to 512); the transformers fast loop: 7.6k at <= 64 tokens, 3.8k at 512
# Between the two nothing was measured; 1e9 puts every model of the seed's size on vLLM.
VLLM_MIN_PARAMETERS = 1_000_000_000


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def auto_backend(loaded) -> str:
    """What `auto` means for this model on this device: vllm on a GPU where it imports and the model has at least
    VLLM_MIN_PARAMETERS parameters, else transformers-fast."""
    if loaded.device.type == "cuda" and vllm_available() and parameter_count(loaded.model) >= VLLM_MIN_PARAMETERS:
        return "vllm"
    return "transformers-fast"


def make_generator(backend: str, loaded, lora_rank: int = 32) -> Generator:
    """backend: auto | transformers-fast | transformers | vllm (ValueError otherwise). auto = `auto_backend`;
    transformers-fast = shared prefill per prompt, early exit of finished rows, adapter merged into fp32 weights,
    batch sized to the device; `transformers` is plain `generate()` with the adapter attached, the reference the
    fast one is tested against (tests/core/test_fast_paths.py). lora_rank: the adapters' rank (vLLM sizes its LoRA
    slots at start-up; the same rank for on-policy data and completions lets them share one engine)."""
    if backend not in BACKENDS:
        raise ValueError(f"generation backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = auto_backend(loaded)
    if backend == "vllm":
        return VllmGenerator(loaded, lora_rank=lora_rank)
    return TransformersGenerator.fast(loaded) if backend == "transformers-fast" else TransformersGenerator(loaded)
