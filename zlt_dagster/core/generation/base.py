"""The one interface every generation backend implements."""
from __future__ import annotations

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


# the backend names make_generator (factory.py) accepts; the CLI offers them as --backend choices
BACKENDS = ("auto", "transformers-fast", "transformers", "vllm")
