"""The one interface every generation backend implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from .progress import GenerationProgress


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
    # how the backend runs its decode steps, for the records (stats.json); None = nothing to say beyond `name`
    decode_path: str | None = None

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The ids this generator stops at (LoadedModel.stop_token_ids: end-of-turn, then the model's generation
        config eos ids), recorded with what it generates; () for a generator without a loaded model."""
        loaded = getattr(self, "loaded", None)
        return tuple(loaded.stop_token_ids) if loaded is not None else ()

    @abstractmethod
    def generate(self, prompts: Sequence[PromptSpec], n_samples: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, adapter_dir: str | None = None,
                 batch_size: int = 32, progress: GenerationProgress | None = None) -> list[Completion]:
        """n_samples completions for every prompt, sampled, stopping at the first of `stop_token_ids`.
        Returned in (prompt_index, sample_index) order.

        batch_size: rows (sequences) per batch, >= 1; 0 = the backend sizes it to the device at this call, from
        these prompts and max_new_tokens (generation/batch_size.py; a CPU gets a fixed CPU size). A backend that
        schedules its own batches (vLLM) may ignore it, and says so through `progress.set_batch`. Negative:
        ValueError.

        progress: what a backend must call when it is given one (generation/progress.py), so that a long step
        shows tokens, tokens/s and an ETA:
          progress.set_batch(rows, source=None) once it knows its rows per batch (source: how it sized them
            when batch_size was 0, e.g. "auto: 2,200 of 2,200 rows from 120.3 GiB free"; None = as given);
          progress.advance(tokens=, sequences=) as tokens are generated and sequences end, at least once per
            batch, as increments; by return the sums should equal sum(c.n_new_tokens) and len(result).
        It never logs by itself and never forces a host synchronisation the backend would not do anyway."""


# the backend names make_generator (factory.py) accepts; the CLI offers them as --backend choices
BACKENDS = ("auto", "transformers-fast", "transformers", "vllm")
