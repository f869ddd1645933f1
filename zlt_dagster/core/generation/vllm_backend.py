"""vLLM backend (the GPU image): one engine per base model and process, LoRA adapters per request via LoRARequest.

Two things matter when several steps share a process (the in-process executor of `zlt demo` / `zlt run` on a GPU
machine; on Kubernetes every step is its own pod, so one engine per pod anyway):
- the engine is built once per (model, LoRA rank) and reused: a second `LLM(...)` would wait ~1 min to start and
  reserve its own share of GPU memory on top of the first;
- vLLM reserves `gpu_memory_utilization` x total memory at start-up and refuses to start if that is not free. The
  pipeline's transformers copy of the base model (tokenizer, chat template, ARC) is already on the GPU: 15 GB for
  a 7B model in bf16, so a fixed 0.85 of an 80 GB card does not fit. The default is therefore what is free now,
  less a margin, capped at 0.85.
vLLM caches adapters by `lora_int_id`: an id names one adapter's CONTENT, so it is keyed by path and the weights
file's size and mtime (a reused temporary path with a new adapter gets a new id).
"""
from __future__ import annotations

import os
from typing import Sequence

from .base import Completion, Generator, PromptSpec

MAX_MEMORY_FRACTION = 0.85
MEMORY_MARGIN = 0.05  # of total memory, left for CUDA graphs, the sampler and fragmentation
_ENGINES: dict[tuple[str, int], object] = {}
_LORA_IDS: dict[tuple[str, int, int], int] = {}


def memory_fraction(requested: float | None = None) -> float:
    """The share of GPU memory the engine may take: `requested`, or (free now - margin), at most 0.85."""
    if requested is not None:
        if not 0 < requested <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {requested}")
        return requested
    import torch

    if not torch.cuda.is_available():
        return MAX_MEMORY_FRACTION
    free, total = torch.cuda.mem_get_info()
    fraction = min(MAX_MEMORY_FRACTION, free / total - MEMORY_MARGIN)
    if fraction < 0.2:
        raise RuntimeError(f"only {free / 2**30:.1f} of {total / 2**30:.1f} GiB GPU memory is free: too little for "
                           "a vLLM engine (another process, or a model left on the GPU)")
    return fraction


def _adapter_key(adapter_dir: str) -> tuple[str, int, int]:
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    st = os.stat(weights)  # a missing adapter is an error here, not inside the engine
    return os.path.realpath(adapter_dir), st.st_size, st.st_mtime_ns


class VllmGenerator(Generator):
    name = "vllm"

    def __init__(self, loaded, max_lora_rank: int = 32, gpu_memory_utilization: float | None = None):
        from vllm import LLM  # imported here: vllm is only in the GPU image

        self.loaded = loaded
        key = (loaded.source, max_lora_rank)
        if key not in _ENGINES:
            _ENGINES[key] = LLM(model=loaded.source, enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1,
                                gpu_memory_utilization=memory_fraction(gpu_memory_utilization), seed=0)
        self.llm = _ENGINES[key]

    def _lora_request(self, adapter_dir: str | None):
        if adapter_dir is None:
            return None
        from vllm.lora.request import LoRARequest

        lora_id = _LORA_IDS.setdefault(_adapter_key(adapter_dir), len(_LORA_IDS) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, adapter_dir)

    def generate(self, prompts: Sequence[PromptSpec], n_samples: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, adapter_dir: str | None = None,
                 batch_size: int = 32) -> list[Completion]:
        from vllm import SamplingParams

        lm = self.loaded
        # the same stop ids as the transformers backends (vLLM adds the generation config's eos ids by itself; listing
        # them keeps the two equal whatever the vLLM version does)
        params = SamplingParams(n=n_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                seed=seed, stop_token_ids=list(self.stop_token_ids), skip_special_tokens=True)
        token_prompts = [{"prompt_token_ids": lm.prompt_ids(p.system, p.user)} for p in prompts]
        results = self.llm.generate(token_prompts, params, lora_request=self._lora_request(adapter_dir),
                                    use_tqdm=False)
        out = []
        for i, res in enumerate(results):
            for s, o in enumerate(res.outputs):
                # vLLM reports "stop" for a stop token and "length" for max_tokens, like the transformers backend;
                # its token_ids already hold the stop token when it stopped on one.
                n_new = len(o.token_ids)
                out.append(Completion(prompt_index=i, sample_index=s, text=o.text, n_new_tokens=n_new,
                                      finish_reason=o.finish_reason))
        return out
