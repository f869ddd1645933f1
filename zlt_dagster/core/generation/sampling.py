"""The sync-light decode loop (issue 6): `sample_new_tokens(...)` is the decode loop `generate()` runs, without
its per-step host synchronisation: the host checks for finished rows only every `check_every` steps, and finished
rows are dropped from the batch and the KV cache ("early exit"/compaction) instead of being carried to the longest
row's length. Same token-by-token function as `generate()`: left padding, position ids = cumsum(mask) - 1, logits
of the last position, temperature then top-p (HF's TopP warper rule), stop at the first of the `eos_id` ids, pad
after it. Proven equal to `generate()` by tests/core/test_fast_paths.py. After the prompt the steps run on
transformers' DynamicCache or, on CUDA, on generation/static_decode.py (preallocated cache, our Triton
decode-attention kernel else flash varlen, CUDA graphs; `decode`).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ... import settings
from ..compiled_layers import backend_for, compiled_decoder_layers
from . import static_attention, static_decode
from .cache_keyword import cache_kwargs

# the static decode keeps at least this many rows when finished ones leave (sample_new_tokens)
MIN_STATIC_ROWS = 2


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper (min_tokens_to_keep=1)."""
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    remove = remove.scatter(1, sorted_idx, remove)
    return scores.masked_fill(remove, float("-inf"))


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's next token, int64 [rows], and (sampling only; None for greedy) bool [rows]: the row's
    probabilities held NaN (its logits were not finite), which torch.multinomial would refuse.

    Sampling draws what torch.multinomial(probs, 1) draws from the same generator state: it IS its one-sample path
    (aten/src/ATen/native/Distributions.cpp: argmax(p / q) with q ~ Exp(1), the Gumbel-max trick), minus the
    validation in front of it, which reads two reductions back to the host (`.item()`) every call: a device sync
    per decode step that kept the host from queueing the next step while the GPU ran this one. The NaN check
    stays, as a device-side flag the loop reads at its periodic sync. Temperature 1 skips the division and casts
    inside the softmax (softmax(x, dtype=float32) casts x first: the same probabilities for fp32 and bf16 logits;
    fp16 ones take another CUDA kernel there and differ in the last bits, never in the tokens drawn in 11,000
    draws on the H200); greedy takes the argmax in the logits' dtype (the cast to float32 is exact and keeps the
    order)."""
    if temperature == 0:
        return logits.argmax(dim=-1), None
    if temperature == 1.0 and top_p >= 1.0:
        probs = logits.softmax(dim=-1, dtype=torch.float32)
    else:
        scores = logits.float() / temperature
        if top_p < 1.0:
            scores = _top_p_filter(scores, top_p)
        probs = scores.softmax(dim=-1)
    q = torch.empty_like(probs).exponential_()
    torch.div(probs, q, out=q)
    tokens = q.argmax(dim=-1)
    return tokens, q.gather(1, tokens[:, None]).squeeze(1).isnan()


def _check_finite(nan_rows: int, step: int) -> None:
    if nan_rows:
        raise RuntimeError(f"sampling: the next-token probabilities of {nan_rows} row(s) held NaN by step {step} "
                           "(the model's logits are not finite); torch.multinomial refuses these too")


def decode_compile_backend(model, decode_compile: str | None = None) -> str | None:
    """The torch.compile backend the static decode runs `model`'s decoder layers through (None = eager):
    `decode_compile`, or ZLT_DECODE_COMPILE when None, by core/compiled_layers.backend_for's rule (auto =
    inductor on CUDA for models under 1B parameters where Triton can build kernels). ValueError naming the setting
    for an unknown backend. (Whether compiling pays off in a process is the step layer's call:
    steps/common.ComputeSettings.decode_compile_for.)"""
    value, name = ((settings.decode_compile(), "ZLT_DECODE_COMPILE") if decode_compile is None
                   else (decode_compile, "decode_compile"))
    return backend_for(value, model, next(model.parameters()).device, name)


def decode_path(model, decode: str = "auto", graphs: bool | None = None, decode_compile: str | None = None) -> str:
    """What `sample_new_tokens(model, ..., decode=decode, graphs=graphs, decode_compile=decode_compile)` runs
    after the prompt, for records: "static[, CUDA graphs][, layers compiled (<backend>)], <attention> attention"
    (static_attention.attention_path: "triton gqa", "flash varlen (why not triton)" or "sdpa (why not the others)") or
    "dynamic" (with the reason where auto fell back). ValueError for an unknown `decode`, "static" on a model that
    cannot (the reason named), or an unknown compile backend; settings.SettingsError for a bad ZLT_DECODE_ATTENTION."""
    if decode not in ("auto", "static", "dynamic"):
        raise ValueError(f"decode={decode!r}; expected auto, static or dynamic")
    if decode == "dynamic":
        return "dynamic"
    settings.decode_attention()  # a bad ZLT_DECODE_ATTENTION fails here, also where the CPU would not read it
    backend = decode_compile_backend(model, decode_compile)  # likewise a bad ZLT_DECODE_COMPILE
    why_not = static_decode.unsupported_reason(model)
    if why_not and decode == "static":
        raise ValueError(f"decode='static' is not possible for this model: {why_not}")
    cuda = next(model.parameters()).device.type == "cuda"
    if why_not:
        return f"dynamic ({why_not})"
    if decode == "auto" and not cuda:
        return "dynamic (CPU)"
    graphed = ", CUDA graphs" if (cuda if graphs is None else graphs) else ""
    compiled = f", layers compiled ({backend})" if backend else ""
    return f"static{graphed}{compiled}, {static_attention.attention_path(model)} attention"


@torch.inference_mode()
def sample_new_tokens(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int | Sequence[int],
                      pad_id: int, temperature: float = 1.0, top_p: float = 1.0, check_every: int = 16,
                      compact_fraction: float = 0.125, repeats: int = 1, progress=None, decode: str = "auto",
                      graphs: bool | None = None, decode_compile: str | None = None) -> torch.Tensor:
    """New tokens for every prompt, [len(prompts) * repeats, steps] on the model's device, `pad_id` after a row's
    first stop token (which is kept), steps = the longest row's length (like `generate()`'s output minus the prompt).

    eos_id: one stop id or several (generate()'s eos_token_id list: Qwen2.5-Instruct stops at <|im_end|> and at
    <|endoftext|>); a row ends at the first of them it samples.

    repeats: samples per prompt, rows in prompt-major order (p0 s0, p0 s1, ..., p1 s0, ...). The prompt is run
    through the model ONCE and its KV cache copied `repeats` times (shared prefill): a prompt's samples differ only
    after the prompt, so this is the same computation as feeding each copy separately, `repeats` times cheaper
    for the prompt part (the paper samples 10 per prompt; on a CPU the prompt is most of a short answer's cost).
    temperature 0 = greedy. Every `check_every` steps the host looks at which rows finished; if at least
    `compact_fraction` of the live rows are done they are removed from the batch and the KV cache.

    progress (a GenerationProgress, generation/progress.py): told the tokens generated and the rows finished at
    each of those checks, read in the same device-to-host copy as the finished count, and the rest at the end;
    tokens counted as Completion.n_new_tokens counts them (the stop token included, padding not).

    decode: how the steps after the prompt run. "static" = generation/static_decode.py (preallocated KV cache, GQA
    attention reading each KV head once, CUDA graphs on CUDA unless graphs=False); "dynamic" = transformers'
    DynamicCache and the model's own attention; "auto" = static on CUDA where the model allows it
    (`static_decode.unsupported_reason`), dynamic elsewhere (a CPU is compute-bound at its small batches: the
    static path's gains are memory traffic and kernel launches). ValueError for another value, or "static" on a
    model that cannot (the reason named).

    decode_compile: the static decode's decoder layers through torch.compile (decode_compile_backend: None =
    ZLT_DECODE_COMPILE, auto = inductor on CUDA for models under 1B parameters; "off"; or a backend), captured
    inside its CUDA graphs: fused RMSNorm, rotary and LoRA arithmetic, fewer kernels a step. The cache writes and
    the attention stay eager kernels inside the same graph (static_decode: graph breaks)."""
    from transformers import DynamicCache

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = next(model.parameters()).device
    static = decode_path(model, decode, graphs, decode_compile).startswith("static")
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
    nan_rows = torch.zeros((), dtype=torch.long, device=device)  # rows whose probabilities held NaN, all steps
    reported = (0, 0)  # (tokens, finished rows) told to `progress` so far
    with contextlib.ExitStack() as stack:
        if static:
            stack.enter_context(static_attention.decode_attention(model))
            # after the prompt's forward (eager): one compiled graph set serves every layer and every row count
            # (dynamic=True: rows symbolic from the first compile, so the first compaction does not compile again
            # in the middle of a decode; 5 graphs instead of 9, the same ~22 s cold on the H200)
            stack.enter_context(compiled_decoder_layers(model, decode_compile_backend(model, decode_compile),
                                                        dynamic=True, unspecialized_module_ints=True))
            stepper = static_decode.DecodeStep(
                model, static_decode.static_decode_cache(cache, mask, width + max_new_tokens), pos[:, -1:],
                graphs=graphs)
            cache = kv = None  # its tensors were copied into the static cache: free them
        for step in range(max_new_tokens):
            nxt, nan = _next_tokens(logits, temperature, top_p)
            if nan is not None:
                nan_rows = nan_rows + nan.sum()  # read at the periodic sync, not here (no host sync per step)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[rows, step] = nxt
            newly = torch.isin(nxt, stops) & ~done
            ended[rows] = torch.where(newly, step + 1, ended[rows])
            done = done | newly
            steps = step + 1
            if steps == max_new_tokens:
                break
            if steps % check_every == 0:
                # the loop's one host sync every check_every steps; the token count rides along in the same copy
                n_done, made, n_nan = torch.stack([done.sum(), ended.clamp(max=steps).sum(), nan_rows]).tolist()
                _check_finite(n_nan, steps)
                if progress is not None:
                    finished = n - len(rows) + n_done  # rows dropped earlier had finished
                    progress.advance(tokens=made - reported[0], sequences=finished - reported[1])
                    reported = (made, finished)
                if n_done == len(rows):
                    break
                if n_done and n_done >= compact_fraction * len(rows):
                    keep = (~done).nonzero(as_tuple=True)[0]
                    if static and len(keep) < MIN_STATIC_ROWS <= len(rows):
                        # finished rows fill up to MIN_STATIC_ROWS: compiled layers specialise a batch of one
                        # (dynamo's 0/1 specialisation), which would compile again in the last steps of a decode
                        spare = done.nonzero(as_tuple=True)[0][:MIN_STATIC_ROWS - len(keep)]
                        keep = torch.cat([keep, spare]).sort().values
                    if len(keep) < len(rows):
                        if static:
                            stepper.keep_rows(keep)
                        else:
                            cache.batch_select_indices(keep)
                            mask, pos = mask[keep], pos[keep]
                        rows, nxt, done = rows[keep], nxt[keep], done[keep]
            if static:
                logits = stepper(nxt)
                continue
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            pos = pos[:, -1:] + 1
            logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, **kv,
                           use_cache=True, logits_to_keep=1).logits[:, -1]
    all_done, longest, made, n_nan = torch.stack([done.all().long(), ended.max(), ended.clamp(max=steps).sum(),
                                                  nan_rows]).tolist()
    _check_finite(n_nan, steps)
    if progress is not None:  # every row has finished now, by a stop token or by the limit
        progress.advance(tokens=made - reported[0], sequences=n - reported[1])
    if all_done:
        steps = longest  # the longest row; the columns after it are padding only
    return out[:, :steps]
