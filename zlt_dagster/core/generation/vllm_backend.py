"""vLLM backend (the GPU image): one engine per base model, LoRA adapters per request via LoRARequest."""
from __future__ import annotations

from typing import Sequence

from .base import Completion, Generator, PromptSpec


class VllmGenerator(Generator):
    name = "vllm"

    def __init__(self, loaded, max_lora_rank: int = 32, gpu_memory_utilization: float = 0.85):
        from vllm import LLM  # imported here: vllm is only in the GPU image

        self.loaded = loaded
        self.llm = LLM(model=loaded.source, enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1,
                       gpu_memory_utilization=gpu_memory_utilization, seed=0)
        self._lora_ids: dict[str, int] = {}

    def _lora_request(self, adapter_dir: str | None):
        if adapter_dir is None:
            return None
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.setdefault(adapter_dir, len(self._lora_ids) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, adapter_dir)

    def generate(self, prompts: Sequence[PromptSpec], n_samples: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, adapter_dir: str | None = None,
                 batch_size: int = 32) -> list[Completion]:
        from vllm import SamplingParams

        lm = self.loaded
        params = SamplingParams(n=n_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                seed=seed, stop_token_ids=[lm.end_of_turn_id], skip_special_tokens=True)
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
