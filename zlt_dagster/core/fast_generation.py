"""Fast paths for sampling with plain transformers (issue 6): merged LoRA weights and a sync-light decode loop.

Two independent levers, each proven equal to the naive path by tests/core/test_fast_paths.py:

* `merged_weights(model, adapter_dir)`: add the adapter's low-rank delta (B @ A * alpha / r, computed in fp32)
  into the base model's Linear weights for the duration of a `with` block, then restore the ORIGINAL weights
  bit-exactly from a copy (no `W + d - d` rounding drift). The forward then costs exactly what the base model costs:
  no per-module LoRA matmuls, dropout or peft dispatch, which at decode time (one token per row) is most of peft's
  overhead.
* `sample_new_tokens(...)`: the decode loop `generate()` runs, without its per-step host synchronisation: the host
  checks for finished rows only every `check_every` steps, and finished rows are dropped from the batch and the KV
  cache ("early exit"/compaction) instead of being carried to the longest row's length.
  Same token-by-token function as `generate()`: left padding, position ids = cumsum(mask) - 1, logits of the last
  position, temperature then top-p (HF's TopP warper rule), stop at the first of the `eos_id` ids, pad after it.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .models import unwrap_peft

_PEFT_PREFIX = "base_model.model."


class AdapterFormatError(ValueError):
    pass


class MergePrecisionError(ValueError):
    """Adding the adapter into the weights' dtype lost too much of it (bf16 rounds small deltas away)."""


def read_lora_deltas(adapter_dir: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """{module name in the base model: (A [r, in], B [out, r])} and the scaling of a saved PEFT LoRA adapter."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{adapter_dir}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if bool(cfg.get(key, False)) != ok:
            raise AdapterFormatError(f"{adapter_dir}: {key}={cfg.get(key)!r} is not supported by merged_weights")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise AdapterFormatError(f"{adapter_dir}: adapters with bias or modules_to_save are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterFormatError(f"{adapter_dir}: per-module rank/alpha patterns are not supported")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                name = key[:-len(suffix)]
                name = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
                pairs.setdefault(name, {})[part] = t
                break
        else:
            raise AdapterFormatError(f"{adapter_dir}: unexpected tensor {key!r} in the adapter")
    out = {}
    for name, d in pairs.items():
        if set(d) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(f"{adapter_dir}: module {name!r} lacks lora_A or lora_B")
        out[name] = (d["lora_A"], d["lora_B"])
    return out, scale


@contextlib.contextmanager
def merged_weights(model, adapter_dir: str | Path | None, backup: str = "cpu",
                   max_rel_error: float | None = 0.1) -> Iterator:
    """Yield `model` with the adapter merged into its Linear weights; restore the original weights exactly after.

    backup: "cpu" (a host copy of each touched weight; GPU memory grows by one layer's temporary only) or
    "device" (a device copy: faster restore, costs a second copy of every touched weight).
    max_rel_error: the merged weights hold dtype(W + delta); over all touched weights,
    ||(merged - W) - delta|| / ||delta|| measures how much of the adapter the weights' dtype kept. In bf16 a small
    adapter (early or low-LR training) is largely ROUNDED AWAY (measured on the H100: a 5-step adapter of a
    7B-shaped model kept almost none of its effect). Above this bound the weights are restored and
    MergePrecisionError is raised; None disables the check. fp32 weights keep ~1e-7."""
    if adapter_dir is None:
        yield model
        return
    if backup not in ("cpu", "device"):
        raise ValueError(f"backup {backup!r} is not one of cpu, device")
    deltas, scale = read_lora_deltas(adapter_dir)
    modules = dict(model.named_modules())
    missing = [n for n in deltas if n not in modules or not isinstance(modules[n], torch.nn.Linear)]
    if missing:
        raise AdapterFormatError(f"adapter targets modules the model lacks (or that are not Linear): {missing[:3]}")
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    err_sq = ref_sq = 0.0
    try:
        with torch.no_grad():
            for name, (a, b) in deltas.items():
                w = modules[name].weight
                if tuple(w.shape) != (b.shape[0], a.shape[1]):
                    raise AdapterFormatError(f"{name}: adapter shape {tuple(b.shape)}x{tuple(a.shape)} does not "
                                             f"match weight {tuple(w.shape)}")
                orig = w.detach().to("cpu", copy=True) if backup == "cpu" else w.detach().clone()
                saved.append((w, orig))
                a32 = a.to(device=w.device, dtype=torch.float32)
                b32 = b.to(device=w.device, dtype=torch.float32)
                delta = (b32 @ a32) * scale
                merged = (w.float() + delta).to(w.dtype)
                if max_rel_error is not None:
                    err_sq += float(((merged.float() - w.float()) - delta).pow(2).sum())
                    ref_sq += float(delta.pow(2).sum())
                w.copy_(merged)
                del delta, merged
        rel = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else 0.0
        if max_rel_error is not None and rel > max_rel_error:
            raise MergePrecisionError(f"merging {adapter_dir} into {saved[0][0].dtype} weights keeps the adapter "
                                      f"only to a relative error of {rel:.3f} (> {max_rel_error}); use the "
                                      "unmerged adapter for this one")
        yield model
    finally:
        with torch.no_grad():
            for w, orig in saved:
                w.copy_(orig)


def merge_rel_error(model, adapter_dir: str | Path) -> float:
    """||(dtype(W + delta) - W) - delta|| / ||delta|| over all touched weights, without changing the model: how much
    of the adapter a merge into the weights' dtype would lose (what merged_weights checks)."""
    deltas, scale = read_lora_deltas(adapter_dir)
    modules = dict(model.named_modules())
    err_sq = ref_sq = 0.0
    with torch.no_grad():
        for name, (a, b) in deltas.items():
            w = modules[name].weight
            delta = (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)) * scale
            err_sq += float((((w.float() + delta).to(w.dtype).float() - w.float()) - delta).pow(2).sum())
            ref_sq += float(delta.pow(2).sum())
    return math.sqrt(err_sq / ref_sq) if ref_sq > 0 else 0.0


def cache_kwargs(model, cache) -> dict:
    """The KV cache as the keyword this transformers version's forward takes: `cache` from 5.2x (where
    `past_key_values` still works but warns that 5.40 removes it), `past_key_values` before (5.17 on the GPU
    machine)."""
    import inspect

    base = unwrap_peft(model)
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return {name: cache}


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper (min_tokens_to_keep=1)."""
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    remove = remove.scatter(1, sorted_idx, remove)
    return scores.masked_fill(remove, float("-inf"))


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    scores = logits.float()
    if temperature == 0:
        return scores.argmax(dim=-1)
    scores = scores / temperature
    if top_p < 1.0:
        scores = _top_p_filter(scores, top_p)
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)


@torch.inference_mode()
def sample_new_tokens(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int | Sequence[int],
                      pad_id: int, temperature: float = 1.0, top_p: float = 1.0, check_every: int = 16,
                      compact_fraction: float = 0.125, repeats: int = 1) -> torch.Tensor:
    """New tokens for every prompt, [len(prompts) * repeats, steps] on the model's device, `pad_id` after a row's
    first stop token (which is kept), steps = the longest row's length (like `generate()`'s output minus the prompt).

    eos_id: one stop id or several (generate()'s eos_token_id list: Qwen2.5-Instruct stops at <|im_end|> and at
    <|endoftext|>); a row ends at the first of them it samples.

    repeats: samples per prompt, rows in prompt-major order (p0 s0, p0 s1, ..., p1 s0, ...). The prompt is run
    through the model ONCE and its KV cache copied `repeats` times (shared prefill): a prompt's samples differ only
    after the prompt, so this is the same computation as feeding each copy separately, `repeats` times cheaper
    for the prompt part (the paper samples 10 per prompt; on a CPU the prompt is most of a short answer's cost).
    temperature 0 = greedy. Every `check_every` steps the host looks at which rows finished; if at least
    `compact_fraction` of the live rows are done they are removed from the batch and the KV cache."""
    from transformers import DynamicCache

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = next(model.parameters()).device
    stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=torch.long, device=device)
    if stops.numel() == 0:
        raise ValueError("eos_id names no stop token")
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    pos = mask.long().cumsum(-1) - 1
    pos.masked_fill_(mask == 0, 1)
    n = len(prompts) * repeats
    out = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(n, device=device)            # original row of each live row
    done = torch.zeros(n, dtype=torch.bool, device=device)
    ended = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)  # a row's length, eos included
    cache = DynamicCache()
    kv = cache_kwargs(model, cache)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kv, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        logits, mask, pos = (t.repeat_interleave(repeats, dim=0) for t in (logits, mask, pos))
    steps = 0
    for step in range(max_new_tokens):
        nxt = _next_tokens(logits, temperature, top_p)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[rows, step] = nxt
        newly = torch.isin(nxt, stops) & ~done
        ended[rows] = torch.where(newly, step + 1, ended[rows])
        done = done | newly
        steps = step + 1
        if steps == max_new_tokens:
            break
        if steps % check_every == 0:
            n_done = int(done.sum())
            if n_done == len(rows):
                break
            if n_done and n_done >= compact_fraction * len(rows):
                keep = (~done).nonzero(as_tuple=True)[0]
                cache.batch_select_indices(keep)
                rows, mask, pos, nxt, done = rows[keep], mask[keep], pos[keep], nxt[keep], done[keep]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        pos = pos[:, -1:] + 1
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, **kv,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
    if bool(done.all()):
        steps = int(ended.max())  # the longest row; the columns after it are padding only
    return out[:, :steps]
