"""The one interface every generation backend implements."""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class PromptSpec:
    system: str
    user: str


@dataclass(frozen=True)
class Completion:
    prompt_index: int
    sample_index: int
    text: str            # decoded new tokens, end-of-turn excluded
    n_new_tokens: int    # new tokens, the stop token included when generated
    finish_reason: str   # "stop" (a stop token: end-of-turn or another generation-config eos) or "length"


class Generator(ABC):
    name: str

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The ids this generator stops at (LoadedModel.stop_token_ids: end-of-turn, then the model's generation
        config eos ids), recorded with what it generates; () for a generator without a loaded model."""
        loaded = getattr(self, "loaded", None)
        return tuple(loaded.stop_token_ids) if loaded is not None else ()

    @abstractmethod
    def generate(self, prompts: Sequence[PromptSpec], n_samples: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, adapter_dir: str | None = None,
                 batch_size: int = 32) -> list[Completion]:
        """n_samples completions for every prompt, sampled, stopping at the first of `stop_token_ids`.
        Returned in (prompt_index, sample_index) order."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


BACKENDS = ("auto", "transformers-fast", "transformers", "vllm")


def make_generator(backend: str, loaded) -> Generator:
    """backend: auto | transformers-fast | transformers | vllm. auto = vLLM when it imports and a GPU is present,
    else transformers-fast (shared prefill per prompt, early exit of finished rows, adapter merged into fp32
    weights); `transformers` is plain `generate()` with the adapter attached, the reference the fast one is tested
    against (tests/core/test_fast_paths.py)."""
    if backend not in BACKENDS:
        raise ValueError(f"generation backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "vllm" if (vllm_available() and loaded.device.type == "cuda") else "transformers-fast"
    if backend == "vllm":
        from .vllm_backend import VllmGenerator
        return VllmGenerator(loaded)
    from .transformers_backend import TransformersGenerator
    return TransformersGenerator.fast(loaded) if backend == "transformers-fast" else TransformersGenerator(loaded)
