"""Batched sampling with plain transformers: left padding, stop at the end-of-turn token, adapters unmerged.

The base model stays shared and untouched: an adapter is attached for the call and removed afterwards."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .base import Completion, Generator, PromptSpec


@contextlib.contextmanager
def attached_adapter(model, adapter_dir: str | None):
    """Yield the model with the LoRA adapter at `adapter_dir` attached (unmerged), then remove it again."""
    if adapter_dir is None:
        yield model
        return
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    peft_model.eval()
    try:
        yield peft_model
    finally:
        peft_model.unload()  # strips the LoRA layers; base weights were never merged, so they are unchanged


class TransformersGenerator(Generator):
    """merge_adapter=True adds the adapter into the base weights for the call and restores them exactly afterwards
    (core.fast_generation.merged_weights); loop="fast" uses core.fast_generation.sample_new_tokens (no per-step host
    sync, finished rows leave the batch) instead of `generate()`. The defaults are the original path."""
    name = "transformers"

    def __init__(self, loaded, merge_adapter: bool = False, loop: str = "hf"):
        if loop not in ("hf", "fast"):
            raise ValueError(f"loop {loop!r} is not one of hf, fast")
        self.loaded = loaded
        self.merge_adapter = merge_adapter
        self.loop = loop

    @torch.inference_mode()
    def generate(self, prompts: Sequence[PromptSpec], n_samples: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, adapter_dir: str | None = None,
                 batch_size: int = 32) -> list[Completion]:
        lm, tok = self.loaded, self.loaded.tokenizer
        jobs = [(i, s) for i in range(len(prompts)) for s in range(n_samples)]
        prompt_ids = [lm.prompt_ids(p.system, p.user) for p in prompts]
        pad = tok.pad_token_id
        out: list[Completion] = []
        gen = torch.Generator(device="cpu").manual_seed(seed)
        if self.merge_adapter:
            from ..fast_generation import merged_weights as attach
        else:
            attach = attached_adapter
        with attach(lm.model, adapter_dir) as model:
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start:start + batch_size]
                seqs = [prompt_ids[i] for i, _ in chunk]
                width = max(map(len, seqs))
                # left padding: every prompt ends at the same column, so new tokens line up
                ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=lm.device)
                mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=lm.device)
                # one seed per batch drawn from a seeded stream: reproducible for a fixed batch size
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                if self.loop == "fast":
                    from ..fast_generation import sample_new_tokens

                    new = sample_new_tokens(model, seqs, max_new_tokens, lm.end_of_turn_id, pad,
                                            temperature=temperature, top_p=top_p)
                    out.extend(self._decode(new, chunk))
                    continue
                res = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                     top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                                     eos_token_id=lm.end_of_turn_id, pad_token_id=pad)
                out.extend(self._decode(res[:, width:], chunk))
        return out

    def _decode(self, new: torch.Tensor, chunk) -> list[Completion]:
        lm, tok = self.loaded, self.loaded.tokenizer
        done = []
        for row, (i, s) in zip(new.tolist(), chunk):
            if lm.end_of_turn_id in row:
                cut = row.index(lm.end_of_turn_id)
                text_ids, n_new, reason = row[:cut], cut + 1, "stop"
            else:
                text_ids, n_new, reason = row, len(row), "length"
            text = tok.decode(text_ids, skip_special_tokens=True)
            done.append(Completion(prompt_index=i, sample_index=s, text=text, n_new_tokens=n_new,
                                   finish_reason=reason))
        return done
