"""Batched sampling with plain transformers: left padding, stop at any stop id of the model (end-of-turn plus its
generation config's eos ids), adapters unmerged.

The base model stays shared and untouched: an adapter is attached for the call and removed afterwards."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..models import quiet_peft
from .base import Completion, Generator, PromptSpec
from .batch_size import KV_HEADROOM, STATIC_KV_HEADROOM, for_generation
from .merging import merged_weights
from .progress import GenerationProgress
from .sampling import decode_path, sample_new_tokens


@contextlib.contextmanager
def attached_adapter(model, adapter_dir: str | None):
    """Yield the model with the LoRA adapter at `adapter_dir` attached (unmerged, its weights in the base model's
    dtype), then remove it again."""
    if adapter_dir is None:
        yield model
        return
    from peft import PeftModel

    with quiet_peft():
        # the adapter in the base's dtype (peft would upcast a bf16 base's adapter to fp32): bf16 LoRA matmuls, as
        # the seed's vLLM ran them and as training's bf16 autocast computed them. Measured on the H200
        # (benchmarks/gen_h200/, run 6): with fp32 adapters, fp32 SIMT GEMMs, fp32 adds and dtype casts around
        # every LoRA'd Linear were ~40% of a 2,200-row decode step's kernel time. Not a merge: the base weights
        # stay untouched, so nothing of a small adapter is rounded away (see merges_adapters).
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False, autocast_adapter_dtype=False)
    peft_model.eval()
    try:
        yield peft_model
    finally:
        peft_model.unload()  # strips the LoRA layers; base weights were never merged, so they are unchanged


def merges_adapters(loaded) -> bool:
    """Whether the fast paths merge an adapter into the weights: only fp32 ones. Merging into bf16 rounds a small
    adapter away (measured on the H100: a 5-step 7B adapter kept almost none of its effect)."""
    return loaded.dtype == torch.float32


@contextlib.contextmanager
def applied_adapter(loaded, adapter_dir: str | None, merge: bool | None = None):
    """The base model with the adapter merged (weights restored bit-exactly afterwards) or attached.
    merge=None: merged into fp32 weights, attached to bf16 ones (`merges_adapters`), so that an adapter costs no
    extra FLOPs where merging is exact enough."""
    if merges_adapters(loaded) if merge is None else merge:
        with merged_weights(loaded.model, adapter_dir) as model:
            yield model
    else:
        with attached_adapter(loaded.model, adapter_dir) as model:
            yield model


class TransformersGenerator(Generator):
    """merge_adapter=True adds the adapter into the base weights for the call and restores them exactly afterwards
    (generation/merging.py); loop="fast" uses generation/sampling.py (one prefill per
    prompt shared by its samples, no per-step host sync, finished rows leave the batch) instead of `generate()`;
    decode: the fast loop's decode path (sampling.sample_new_tokens: auto, static or dynamic); decode_compile: its
    decoder layers through torch.compile on the static path (None = ZLT_DECODE_COMPILE; auto, off or a backend).
    The defaults are the original path; `fast(loaded)` is what the pipeline uses without vLLM."""
    name = "transformers"

    def __init__(self, loaded, merge_adapter: bool = False, loop: str = "hf", decode: str = "auto",
                 decode_compile: str | None = None):
        if loop not in ("hf", "fast"):
            raise ValueError(f"loop {loop!r} is not one of hf, fast")
        self.loaded = loaded
        self.merge_adapter = merge_adapter
        self.loop = loop
        self.decode, self.decode_compile = decode, decode_compile
        # ValueError now for a bad value, a model that cannot, or an unknown compile backend
        decode_path(loaded.model, decode, decode_compile=decode_compile)
        if loop == "fast" or merge_adapter:
            self.name = "transformers-fast" + ("" if merge_adapter else "-unmerged")

    @property
    def decode_path(self) -> str:
        """The fast loop's decode path on this model (sampling.decode_path: static with CUDA graphs on CUDA where the
        model allows, else dynamic), or "generate()" for the plain loop."""
        return (decode_path(self.loaded.model, self.decode, decode_compile=self.decode_compile) if self.loop == "fast"
                else "generate()")

    @classmethod
    def fast(cls, loaded, decode_compile: str | None = None) -> "TransformersGenerator":
        """The fast loop, with the adapter merged only into fp32 weights (`merges_adapters`)."""
        return cls(loaded, merge_adapter=merges_adapters(loaded), loop="fast", decode_compile=decode_compile)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[PromptSpec], n_samples: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, adapter_dir: str | None = None,
                 batch_size: int = 32, progress: GenerationProgress | None = None) -> list[Completion]:
        """See Generator.generate. batch_size 0 = sized to the device's free memory at this call
        (batch_size.for_generation); the fast loop runs whole prompts per batch (their samples share its
        prefill), so its rows are batch_size rounded down to a multiple of n_samples (at least one prompt)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size={batch_size!r}; expected rows per batch >= 1, or 0 = sized to the device")
        lm, tok = self.loaded, self.loaded.tokenizer
        jobs = [(i, s) for i in range(len(prompts)) for s in range(n_samples)]
        prompt_ids = [lm.prompt_ids(p.system, p.user) for p in prompts]
        pad = tok.pad_token_id
        out: list[Completion] = []
        gen = torch.Generator(device="cpu").manual_seed(seed)
        sized = None
        if batch_size == 0:
            static = self.loop == "fast" and self.decode_path.startswith("static")
            sized = for_generation(lm.model, lm.device, max(map(len, prompt_ids), default=1), max_new_tokens,
                                   max(1, len(jobs)), kv_headroom=STATIC_KV_HEADROOM if static else KV_HEADROOM)
            batch_size = sized.rows
        if self.loop == "fast":
            # whole prompts per batch, so that a prompt's samples share its prefill (sample_new_tokens' repeats)
            step = max(1, batch_size // n_samples) * n_samples
        else:
            step = batch_size
        if progress is not None:
            progress.set_batch(min(step, len(jobs)), sized.source if sized else None)
        with applied_adapter(lm, adapter_dir, merge=self.merge_adapter) as model:
            for start in range(0, len(jobs), step):
                chunk = jobs[start:start + step]
                seqs = [prompt_ids[i] for i, _ in chunk]
                width = max(map(len, seqs))
                # left padding: every prompt ends at the same column, so new tokens line up
                ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=lm.device)
                mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=lm.device)
                # one seed per batch drawn from a seeded stream: reproducible for a fixed batch size
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                if self.loop == "fast":
                    new = sample_new_tokens(model, seqs[::n_samples], max_new_tokens, self.stop_token_ids, pad,
                                            temperature=temperature, top_p=top_p, repeats=n_samples,
                                            progress=progress, decode=self.decode,
                                            decode_compile=self.decode_compile)
                    out.extend(self._decode(new, chunk))
                    continue
                res = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                     top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                                     eos_token_id=list(self.stop_token_ids), pad_token_id=pad)
                done = self._decode(res[:, width:], chunk)
                if progress is not None:  # generate() reports nothing while it runs: once per batch
                    progress.advance(tokens=sum(c.n_new_tokens for c in done), sequences=len(done))
                out.extend(done)
        return out

    def _decode(self, new: torch.Tensor, chunk) -> list[Completion]:
        stops = set(self.stop_token_ids)
        kept = []
        for row in new.tolist():
            cut = next((k for k, t in enumerate(row) if t in stops), None)
            if cut is not None:  # the FIRST stop id ends the answer, whichever it is
                kept.append((row[:cut], cut + 1, "stop"))
            else:
                kept.append((row, len(row), "length"))
        texts = decode_texts(self.loaded.tokenizer, [ids for ids, _, _ in kept])
        return [Completion(prompt_index=i, sample_index=s, text=text, n_new_tokens=n_new, finish_reason=reason)
                for (i, s), text, (_, n_new, reason) in zip(chunk, texts, kept)]


def decode_texts(tokenizer, rows: list[list[int]]) -> list[str]:
    """tokenizer.decode(row, skip_special_tokens=True) for every row: through the Rust tokenizer's decode_batch
    (parallel) where the tokenizer's decode is exactly that call per row (transformers' TokenizersBackend._decode:
    a fast tokenizer that cleans up no spaces, `_cleans_up_spaces`); one by one otherwise. Why: 2,200 completions
    of ~410 tokens took 0.44 s one by one on 2 cores (0.21 s batched), a few percent of a completions step on the
    H200."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or _cleans_up_spaces(tokenizer):
        return [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    return backend.decode_batch(rows, skip_special_tokens=True)


# transformers' switch that forces the clean-up on BPE tokenizers; the versions that have it (5.17 on the GPU
# machine, 5.24 here) skip the clean-up for BPE models without it, with a warning per decode
_FORCE_BPE_CLEAN_UP = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"


def _cleans_up_spaces(tokenizer) -> bool:
    """Whether tokenizer.decode post-processes the Rust decoder's text (clean_up_tokenization_spaces). SmolLM2's
    tokenizer loads with the flag True under transformers 5.17 and False under 5.24; both ignore it for a BPE
    model unless _FORCE_BPE_CLEAN_UP is set."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return False
    if not hasattr(tokenizer, _FORCE_BPE_CLEAN_UP):  # a transformers that cleans up BPE text too
        return True
    return type(tokenizer.backend_tokenizer.model).__name__ != "BPE" or bool(getattr(tokenizer, _FORCE_BPE_CLEAN_UP))
