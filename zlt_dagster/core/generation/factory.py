"""Picks a generation backend by name: the only place that knows every backend."""
from __future__ import annotations

import importlib.util

from ..compiled_layers import parameter_count
from . import static_decode
from .base import BACKENDS, Generator
from .transformers_backend import TransformersGenerator
from .vllm_backend import VllmGenerator  # imports vllm itself only when a VllmGenerator is built

# What `auto` takes, measured on the H200 (BENCHMARKS.md, "Generation on the H200"; benchmarks/gen_h200/), the
# paper's completions workload (2,200 samples, <= 512 tokens, LoRA r32):
#   SmolLM2-135M  transformers fast loop with the static decode (generation/static_decode.py: CUDA graphs, flash
#                 varlen attention): 88.0k tok/s, 10.3 s a cell (~100k with compiled layers, third session);
#                 before it (DynamicCache) 19.0k; vLLM 0.24 with CUDA graphs to 1,024 rows 25.8k, plus a 128 s
#                 engine start in every process.
#   Qwen2.5-7B    the static decode: 21.7k tok/s, all 2,200 rows in one batch; vLLM 12.9k (graphs to 512).
# So the transformers fast loop wherever the static decode runs the model. vLLM stays `auto`'s choice on a GPU
# only for models the static decode cannot run (sliding-window layers, soft-capping: the transformers loop then
# falls back to DynamicCache, 4-5x slower) and only from this size up, where its engine start pays for itself
# (never measured below 1e9 for such models).
VLLM_MIN_PARAMETERS = 1_000_000_000


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def auto_backend(loaded) -> str:
    """What `auto` means for this model on this device: transformers-fast, except on a GPU for a model the static
    decode cannot run (static_decode.unsupported_reason) with at least VLLM_MIN_PARAMETERS parameters, where vLLM
    imports: vllm."""
    if (loaded.device.type == "cuda" and static_decode.unsupported_reason(loaded.model) is not None
            and vllm_available() and parameter_count(loaded.model) >= VLLM_MIN_PARAMETERS):
        return "vllm"
    return "transformers-fast"


def make_generator(backend: str, loaded, lora_rank: int = 32, decode_compile: str | None = None) -> Generator:
    """backend: auto | transformers-fast | transformers | vllm (ValueError otherwise). auto = `auto_backend`;
    transformers-fast = shared prefill per prompt, early exit of finished rows, adapter merged into fp32 weights,
    batch sized to the device; `transformers` is plain `generate()` with the adapter attached, the reference the
    fast one is tested against (tests/core/test_fast_paths.py). lora_rank: the adapters' rank (vLLM sizes its LoRA
    slots at start-up; the same rank for on-policy data and completions lets them share one engine).
    decode_compile: the transformers fast loop's static decode through torch.compile (None = ZLT_DECODE_COMPILE;
    sampling.decode_compile_backend); vLLM compiles on its own terms."""
    if backend not in BACKENDS:
        raise ValueError(f"generation backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = auto_backend(loaded)
    if backend == "vllm":
        return VllmGenerator(loaded, lora_rank=lora_rank)
    if backend == "transformers-fast":
        return TransformersGenerator.fast(loaded, decode_compile=decode_compile)
    return TransformersGenerator(loaded)
