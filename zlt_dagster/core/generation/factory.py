"""Picks a generation backend by name: the only place that knows every backend."""
from __future__ import annotations

import importlib.util

from .base import BACKENDS, Generator
from .transformers_backend import TransformersGenerator
from .vllm_backend import VllmGenerator  # imports vllm itself only when a VllmGenerator is built


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_generator(backend: str, loaded, lora_rank: int = 32) -> Generator:
    """backend: auto | transformers-fast | transformers | vllm. auto = vLLM when it imports and a GPU is present,
    else transformers-fast (shared prefill per prompt, early exit of finished rows, adapter merged into fp32
    weights); `transformers` is plain `generate()` with the adapter attached, the reference the fast one is tested
    against (tests/core/test_fast_paths.py)."""
    if backend not in BACKENDS:
        raise ValueError(f"generation backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "vllm" if (vllm_available() and loaded.device.type == "cuda") else "transformers-fast"
    if backend == "vllm":
        return VllmGenerator(loaded, lora_rank=lora_rank)
    return TransformersGenerator.fast(loaded) if backend == "transformers-fast" else TransformersGenerator(loaded)
