"""A decode step without host overhead (issue 17, item 3): a preallocated KV cache, attention that reads each KV
head once and only the columns a row has filled, and, on CUDA, the whole step replayed as one CUDA graph.

Why (kernel profile of the loop before, benchmarks/gen_h200/, SmolLM2-135M, 2,200 rows, first 64 steps on the
H200: 117 ms a step, GPU busy 42%, 6,013 kernels a step):
  * transformers' DynamicCache grows by torch.cat: every step copies the whole cache (read + write);
  * with a padding mask, transformers' sdpa cannot pass enable_gqa (torch's flash kernel takes no mask) and calls
    repeat_kv: K and V are written out once per query head (SmolLM2: 9 heads over 3 KV heads; Qwen2.5-7B: 28 over 4)
    and read back by the masked kernel; copies were 34% of the kernel time, the masked attention 28%;
  * ~6,000 kernel launches a step, issued one by one by the host.
What this module does instead:
  * `StaticDecodeCache`: per layer one [rows, capacity, kv_heads, d] buffer for K and one for V, each row's tokens
    LEFT-aligned (the prompt's left padding is removed when the prefilled cache is copied in), so that a row's
    cache is its first `column[row]` slots. A step writes its token's K/V at each row's column (index_put_ with
    device-side columns, so a CUDA graph can replay it);
  * `decode_attention_forward`, registered with transformers' AttentionInterface, for one new token per row:
      - on CUDA where Triton builds kernels, our Triton kernel (decode_kernel.py): one program per (row, KV head),
        the KV head's query heads in one small tile, each row reading exactly its filled slots;
      - else on CUDA (bf16/fp16, Ampere or newer), torch's flash-attention varlen kernel with `seqused_k`: each row
        reads exactly its filled slots, the KV heads natively shared by their query heads (no repeat, no mask);
      - elsewhere (CPU, and where both are missing or disagree with SDPA in a probe, `attention_choice`):
        SDPA over the first `width` slots with a length mask, the query viewed as [rows, kv_heads, heads/kv_heads,
        d] so that a KV head's query heads are rows of one problem over it (K/V read once, nothing repeated);
        `width` rounded up to WIDTH_BUCKET so that a captured graph serves 128 steps;
  * `DecodeStep`: on CUDA the model's forward for one token per row is captured as a CUDA graph per row count (and
    width bucket on the SDPA path) and replayed: one launch a step instead of thousands. Rows leaving the batch
    (sampling.py's compaction) move to the front of the same buffers; the next step captures a graph for the
    smaller batch.
The attention function gets the step's lengths from the DecodeStep forward in progress (`_STEP_BATCH`), not as a
forward keyword as packed training does (core/packing.py): some models' decoder layers drop forward keywords
(StableLm, Nemotron). No attention mask goes to the model, so transformers builds none (masking_utils returns
None for an attention function without a registered mask function). Models with sliding-window layers, attention
soft-capping, latent (MLA) caches or dynamic RoPE keep the DynamicCache loop (`unsupported_reason`).
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ... import settings
from ..models import text_config, unwrap_peft
from .cache_keyword import cache_kwargs

DECODE_ATTENTION = "zlt_decode_attention"
# SDPA path: columns of the cache a step reads, rounded up to a multiple of this (one graph capture per 128 steps;
# on average half a bucket of masked columns read per step: 64 x 23 KB a row on SmolLM2, ~3% of a 512-token
# answer's cache). The Triton and flash paths read exactly the filled columns and need no buckets.
WIDTH_BUCKET = 128
# ZLT_DECODE_ATTENTION picks the path on CUDA (benchmarks compare them): auto = the Triton kernel where its probe
# passes, else flash where its probe passes, else SDPA; triton / flash = that kernel where its probe passes, else
# SDPA; sdpa = SDPA (read through settings.decode_attention at each decode)
ATTENTION_ENV = "ZLT_DECODE_ATTENTION"
# the DecodeBatch of the DecodeStep forward in progress (set around the model call, also while a CUDA graph is
# captured): what decode_attention_forward reads (a forward keyword would not reach it through every model's
# decoder layers: StableLm drops them)
_STEP_BATCH: "DecodeBatch | None" = None


@dataclass
class DecodeBatch:
    """What the attention function needs for one step, built inside the (captured) forward. lengths: int32 [rows],
    filled slots per row including this step's token; cu: int32 [rows + 1], row r's slots start at cu[r] = r x
    capacity in the flattened [rows x capacity] buffer (flash path); cu_q: int32 [rows + 1], arange (flash path: row
    r's g query positions start at cu_q[r] x g); capacity: slots per row of the cache's buffers; width: slots the
    SDPA path reads; mask: bool [rows, 1, 1, width], True = attend (SDPA path); path: one of PATHS."""
    lengths: torch.Tensor
    cu: torch.Tensor | None
    cu_q: torch.Tensor | None
    capacity: int
    width: int
    mask: torch.Tensor | None
    path: str

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"DecodeBatch path {self.path!r}; expected one of {PATHS}")


PATHS = ("triton", "flash", "sdpa")


def _triton(query, key, value, batch: DecodeBatch, scaling):
    """Our Triton kernel (decode_kernel.py) over each row's filled slots, in the model's layouts: no copies."""
    return triton_decode(query, key, value, batch.lengths, scaling)


def triton_decode(query, key, value, lengths, scale):
    """decode_kernel.gqa_decode_attention, imported on first use (Triton is on CUDA machines only). A module
    function so that CPU tests can count its calls."""
    from .decode_kernel import gqa_decode_attention  # lazy: imports triton

    return gqa_decode_attention(query, key, value, lengths, scale)


def _flash(query, key, value, batch: DecodeBatch, scaling):
    """torch's flash-attention varlen forward over each row's filled slots. The g = heads / kv_heads query heads
    that share a KV head go in as g query POSITIONS of that head (not causal: each sees all the row's keys), so
    each KV head is loaded once for its g queries instead of once per query head (flash-attention's own
    "seqlenq_ngroups_swapped" decode trick, which its varlen entry point does not apply): [rows, heads, 1, d] ->
    [rows x g, kv_heads, d], row r's queries at cu_q[r] = r x g. (Native GQA instead, the query as [rows, heads,
    d], measured slower with compiled layers on the H200: their rotary output is not in that layout, so it copied
    more, 94.3-94.8k vs 97.2k tok/s in one call; BENCHMARKS.md, issue 17.)"""
    rows, heads, _, d = query.shape
    kv_heads = key.shape[2]
    g = heads // kv_heads
    # head h = j*g + i (transformers' repeat_kv order) -> query position i of KV head j
    q = query.reshape(rows, kv_heads, g, d).transpose(1, 2).reshape(rows * g, kv_heads, d)
    out = flash_varlen(q, key.view(rows * batch.capacity, kv_heads, d), value.view(rows * batch.capacity, kv_heads, d),
                       batch.cu_q * g, batch.cu, g, batch.capacity, scaling, batch.lengths)
    return out.view(rows, g, kv_heads, d).transpose(1, 2).reshape(rows, 1, heads, d)


def flash_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale, seqused_k):
    """torch's flash-attention varlen forward (aten._flash_attention_forward, not causal, no dropout): q [total_q,
    heads, d], row r's queries q[cu_q[r] : cu_q[r+1]] (at most max_q) attend to its keys k[cu_k[r] : cu_k[r] +
    seqused_k[r]] of k/v [rows x capacity, kv_heads, d]. Returns [total_q, heads, d]. The aten op, not
    torch.nn.attention.varlen.varlen_attn as packed training uses (core/packing.py): the GPU machine's torch 2.11
    varlen_attn has no seqused_k. A module function so that CPU tests can stand a reference in."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False, scale=scale,
                                                   seqused_k=seqused_k)[0]


def _sdpa(query, key, value, batch: DecodeBatch, scaling):
    """SDPA over the first `width` slots with the length mask; the g = heads / kv_heads query heads of KV head j
    (heads j*g .. j*g+g-1: transformers' repeat_kv order) form one [g, d] query block over that head."""
    rows, heads, _, d = query.shape
    kv_heads = key.shape[2]
    k = key[:, :batch.width].transpose(1, 2)   # [rows, kv_heads, width, d], a view
    v = value[:, :batch.width].transpose(1, 2)
    q = query.reshape(rows, kv_heads, heads // kv_heads, d)  # a copy only where rotary left it strided
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, scale=scaling)
    # CUDA kernels return [rows, kv_heads, g, d] in [rows, g, kv_heads, d] memory: reshape copies there
    return out.reshape(rows, heads, 1, d).transpose(1, 2)


def decode_attention_forward(module, query, key, value, attention_mask=None, dropout: float = 0.0, scaling=None,
                             sliding_window=None, softcap=None, s_aux=None, zlt_decode: DecodeBatch | None = None,
                             **kwargs):
    """transformers attention function (AttentionInterface signature) for ONE new token per row.

    query [rows, heads, 1, d]; key, value: the StaticDecodeCache buffers [rows, capacity, kv_heads, d] (heads a
    multiple of kv_heads); zlt_decode: the step's DecodeBatch, None = the one of the DecodeStep forward in progress.
    Returns ([rows, 1, heads, d], None) as transformers' sdpa_attention_forward does. Raises RuntimeError for more
    than one query position, no DecodeBatch (called outside a DecodeStep), a sliding window, soft-capping or
    attention sinks (`unsupported_reason` keeps such models off this path)."""
    if query.shape[2] != 1:
        raise RuntimeError(f"decode attention takes one query position per row, got {query.shape[2]}")
    if zlt_decode is None:
        zlt_decode = _STEP_BATCH
    if zlt_decode is None:
        raise RuntimeError("decode attention runs inside a DecodeStep forward (no DecodeBatch)")
    if sliding_window is not None or softcap is not None or s_aux is not None:
        raise RuntimeError("decode attention has no sliding window, soft-capping or attention sinks")
    attend = {"triton": _triton, "flash": _flash, "sdpa": _sdpa}[zlt_decode.path]
    return attend(query, key, value, zlt_decode, scaling), None


def unsupported_reason(model) -> str | None:
    """Why `model` cannot decode with this module (None = it can): it must switch attention functions through
    transformers' AttentionInterface, use full causal attention in every layer without soft-capping, cache K/V
    themselves (multi-head latent attention caches latents and expands them after the cache: kv_lora_rank), and
    keep its RoPE frequencies fixed (dynamic NTK RoPE recomputes them on the host from the positions in every
    forward: a host read a CUDA graph capture refuses, and a replaced buffer a captured graph would not see)."""
    base = unwrap_peft(model)
    cfg = text_config(base)
    if not getattr(base, "_can_set_attn_implementation", lambda: False)():
        return f"{type(base).__name__} does not use transformers' AttentionInterface"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))}: not all full attention"
    if layer_types is None and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return f"sliding window {cfg.sliding_window}"
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, name, None):
            return f"{name}={getattr(cfg, name)}"
    if getattr(cfg, "kv_lora_rank", None):
        return f"multi-head latent attention (kv_lora_rank={cfg.kv_lora_rank}): the cache holds latents"
    dynamic = sorted(t for t in _rope_types(cfg) if "dynamic" in t)
    if dynamic:
        return f"rope_type {dynamic[0]}: frequencies recomputed on the host every forward"
    return None


def _rope_types(cfg) -> set[str]:
    """The RoPE types of `cfg` (rope_parameters: one dict, or one per layer type; rope_scaling before)."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return set()
    params = list(rope.values()) if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    return {str(p.get("rope_type", p.get("type", "default"))) for p in params if isinstance(p, dict)}


@contextlib.contextmanager
def decode_attention(model) -> Iterator[None]:
    """For the duration, `model` (peft wrapper looked through) attends with `decode_attention_forward`; its previous
    attention implementation is restored on exit, also after an error."""
    from transformers import AttentionInterface

    base = unwrap_peft(model)
    previous = base.config._attn_implementation
    # kept out of torch.compile (a graph break where compiled decoder layers call it): it reads the step's
    # DecodeBatch from a module global (_STEP_BATCH), a new object every step, which a compiled graph would guard on
    AttentionInterface.register(DECODE_ATTENTION, torch.compiler.disable(decode_attention_forward))
    base.set_attn_implementation(DECODE_ATTENTION)
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


_PROBED: dict = {}  # (path, device, dtype, heads, kv_heads, d) -> (usable, why not)


def flash_decode_check(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                       head_dim: int) -> tuple[bool, str]:
    """(whether the flash path runs here, why not). It needs CUDA, bf16/fp16, compute capability >= 8.0, not
    switched off (ZLT_DECODE_ATTENTION=sdpa or triton), and a probe (3 rows of different lengths, this head layout)
    that agrees with the SDPA path (_probe: 2e-2 in 16-bit); a torch whose flash kernel lacks `seqused_k` fails the probe with its
    error. Kept per (device, dtype, heads, kv_heads, d). settings.SettingsError for a bad ZLT_DECODE_ATTENTION."""
    if settings.decode_attention() in ("sdpa", "triton"):
        return False, f"{ATTENTION_ENV}={settings.decode_attention()}"
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False, f"{device.type} {dtype}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False, "compute capability < 8.0"
    return _probed("flash", device, dtype, heads, kv_heads, head_dim)


def flash_decode_ok(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """flash_decode_check's first answer."""
    return flash_decode_check(device, dtype, heads, kv_heads, head_dim)[0]


def triton_decode_check(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                        head_dim: int) -> tuple[bool, str]:
    """(whether our Triton kernel runs here, why not). It needs CUDA (compute capability >= 8.0: bf16 tl.dot),
    Triton importable, a C compiler and Python.h (Triton builds a launcher per kernel:
    compiled_layers.can_build_triton_kernels), not switched off (ZLT_DECODE_ATTENTION=sdpa or flash), and a probe
    (3 rows of different lengths, this head layout) that agrees with the SDPA path (_probe: 2e-2 in 16-bit, 1e-4 in
    fp32); a kernel that fails to build fails the probe with its error. Kept per (device, dtype, heads, kv_heads, d). settings.SettingsError for a
    bad ZLT_DECODE_ATTENTION."""
    import importlib.util  # here: only this check asks

    from ..compiled_layers import can_build_triton_kernels  # here: compiled_layers imports this package's parent

    if settings.decode_attention() in ("sdpa", "flash"):
        return False, f"{ATTENTION_ENV}={settings.decode_attention()}"
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False, f"{device.type} {dtype}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False, "compute capability < 8.0"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if not can_build_triton_kernels():
        return False, "no C compiler or Python.h for Triton's launcher"
    return _probed("triton", device, dtype, heads, kv_heads, head_dim)


def attention_choice(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                     head_dim: int) -> tuple[str, str]:
    """(path, why not a faster one): "triton" where triton_decode_check passes, else "flash" where
    flash_decode_check passes, else "sdpa" with both reasons. settings.SettingsError for a bad ZLT_DECODE_ATTENTION."""
    ok, why_triton = triton_decode_check(device, dtype, heads, kv_heads, head_dim)
    if ok:
        return "triton", ""
    ok, why_flash = flash_decode_check(device, dtype, heads, kv_heads, head_dim)
    if ok:
        return "flash", why_triton
    return "sdpa", f"{why_triton}; {why_flash}" if why_triton != why_flash else why_flash


def _probed(path: str, device, dtype, heads, kv_heads, d) -> tuple[bool, str]:
    key = (path, str(device), dtype, heads, kv_heads, d)
    if key not in _PROBED:
        _PROBED[key] = _probe(path, device, dtype, heads, kv_heads, d)
    return _PROBED[key]


def _probe(path: str, device, dtype, heads, kv_heads, d) -> tuple[bool, str]:
    g = torch.Generator(device=device).manual_seed(0)
    rows, capacity = 3, 80  # 80: the Triton kernel's second K/V block, partly filled, is read too
    q = torch.randn(rows, heads, 1, d, generator=g, device=device, dtype=dtype)
    k = torch.randn(rows, capacity, kv_heads, d, generator=g, device=device, dtype=dtype)
    v = torch.randn(rows, capacity, kv_heads, d, generator=g, device=device, dtype=dtype)
    lengths = torch.tensor([1, 17, 77], device=device, dtype=torch.int32)
    ar = torch.arange(rows + 1, device=device, dtype=torch.int32)
    mask = (torch.arange(capacity, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    ref = _sdpa(q, k, v, DecodeBatch(lengths, None, None, capacity, capacity, mask, "sdpa"), d ** -0.5).float()
    try:
        out = {"triton": _triton, "flash": _flash}[path](
            q, k, v, DecodeBatch(lengths, ar * capacity, ar, capacity, capacity, None, path), d ** -0.5).float()
    except torch.OutOfMemoryError:
        raise  # not a property of the kernel: the decode would not fit either
    except Exception as e:  # noqa: BLE001 - kept as the reason (recorded in every decode's record): the kernel
        # cannot run here (a torch whose flash lacks seqused_k: RuntimeError; Triton failing to build or launch
        # raises its own classes), and the decode takes the next path
        return False, f"{path} probe failed: {type(e).__name__}: {_error_gist(e)}"
    err = float((out - ref).abs().max())
    # fp32: both compute in fp32 (differences ~1e-6; TF32 products would be ~1e-3 off); 16-bit: output rounding
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    return (True, "") if err <= tolerance else (False, f"{path} probe differs from SDPA by {err:.3g}")


def _error_gist(e: Exception) -> str:
    """An error's first line, and its last where that differs (Triton's CompilationError starts with the source
    location and ends with what went wrong), at most ~300 characters."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0][:150] + (f" ... {lines[-1][:150]}" if len(lines) > 1 else "")


def head_layout(model) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) as the model's attention modules compute them (their head_dim and
    num_key_value_groups attributes, which transformers' attention classes carry), else from the config."""
    base = unwrap_peft(model)
    cfg = text_config(base)
    heads = cfg.num_attention_heads
    for module in base.modules():
        if isinstance(getattr(module, "head_dim", None), int) and isinstance(
                getattr(module, "num_key_value_groups", None), int):
            return heads, heads // module.num_key_value_groups, module.head_dim
    return heads, getattr(cfg, "num_key_value_heads", None) or heads, (getattr(cfg, "head_dim", None)
                                                                        or cfg.hidden_size // heads)


ATTENTION_NAMES = {"triton": "triton gqa", "flash": "flash varlen", "sdpa": "sdpa"}


def attention_path(model) -> str:
    """"triton gqa", "flash varlen (why not triton)" or "sdpa (why not the others)" for `model`'s device, dtype and
    head layout (records); the same choice a DecodeStep of this model makes (attention_choice)."""
    p = next(unwrap_peft(model).parameters())
    path, why = attention_choice(p.device, p.dtype, *head_layout(model))
    return ATTENTION_NAMES[path] + (f" ({why})" if why else "")


@functools.cache
def _cache_classes():
    """StaticDecodeCache and its layer, built once on first use: transformers is imported lazily, as elsewhere in
    core. Once: torch.compile guards on a cache's type, so a class built per decode would recompile every layer."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class StaticDecodeLayer(CacheLayerMixin):
        """One layer's K and V: [rows, capacity, kv_heads, d] buffers, rows left-aligned, written at the cache's
        per-row column; attention gets the whole buffers (and the step's lengths through DecodeBatch)."""
        is_compileable = False
        is_sliding = False

        def __init__(self, owner, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.owner, self.keys, self.values = owner, keys, values
            self.device = keys.device
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            raise RuntimeError("StaticDecodeCache is built from a prefilled cache, not lazily")

        def update(self, key_states, value_states, *args, **kwargs):
            # key_states [rows, kv_heads, 1, d] -> slot (row, column[row]) of [rows, capacity, kv_heads, d]
            where = (self.owner.row_index, self.owner.column)
            self.keys.index_put_(where, key_states[:, :, 0])
            self.values.index_put_(where, value_states[:, :, 0])
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[1], 0

        def get_seq_length(self) -> int:
            return self.keys.shape[1]

        def get_max_length(self) -> int:
            return self.keys.shape[1]

    class StaticDecodeCache(Cache):
        """KV cache of the decode loop (module docstring). column: int64 [rows] on the device, the slot the next
        token goes to in each row (= tokens the row holds); row_index: arange(rows) on the device."""

        def __init__(self, prefilled, prompt_mask: torch.Tensor, capacity: int):
            """prefilled: a transformers cache after the prompts' forward (every layer [rows, kv_heads, width, d],
            left-padded as `prompt_mask` [rows, width] says: 1 = token); capacity: slots per row (prompt + new
            tokens). Its tensors are moved in, left-aligned: each of its layers is emptied once copied, so the prompt's
            cache and the new buffers coexist one layer at a time (batch_size.STATIC_KV_HEADROOM). ValueError when a
            prompt is wider than `capacity`."""
            rows, width = prompt_mask.shape
            if width > capacity:
                raise ValueError(f"capacity {capacity} < prompt width {width}")
            lengths = prompt_mask.long().sum(1)
            # slot j of row r holds the prompt's column j + pad[r] (slots past the prompt get a copy of its last
            # column: they are never read, a row's length bounds what attention sees)
            src = (torch.arange(width, device=prompt_mask.device)[None, :] + (width - lengths)[:, None]).clamp(
                max=width - 1)
            layers = []
            for layer in prefilled.layers:
                k, v = layer.keys, layer.values
                if k is None or k.dim() != 4 or k.shape[0] != rows or k.shape[2] != width:
                    raise RuntimeError(f"prefilled cache layer {type(layer).__name__} holds no [rows, heads, "
                                       f"{width}, d] keys")
                bufs = []
                for t in (k, v):
                    buf = t.new_zeros(rows, capacity, t.shape[1], t.shape[3])
                    at = src[:, :, None, None].expand(rows, width, t.shape[1], t.shape[3])
                    buf[:, :width] = torch.gather(t.transpose(1, 2), 1, at)
                    bufs.append(buf)
                layer.keys = layer.values = k = v = None  # moved: the prompt's copy and the buffers coexist per layer
                layers.append(StaticDecodeLayer(self, *bufs))
            super().__init__(layers=layers)
            self.column = lengths.clone()
            self.row_index = torch.arange(rows, device=prompt_mask.device)

        @torch.compiler.disable
        def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
            """Cache.update for this cache's own layers (no lazy layers, no offloading), kept out of torch.compile
            (a graph break where compiled decoder layers call it): the index writes into the [rows, capacity,
            ...] buffers stay two in-place kernels (inductor functionalises a write into a graph input and puts it
            back in place only where its reinplacing pass proves that safe: not risked on buffers this size). The
            layer index it gets from compiled layers is a graph input, not a constant (core/compiled_layers.py:
            one graph for every layer)."""
            return self.layers[layer_idx].update(key_states, value_states)

        @property
        def capacity(self) -> int:
            return self.layers[0].keys.shape[1]

        def keep_rows(self, keep: torch.Tensor) -> None:
            """Keep only rows `keep` (int64, ascending), moved to the front of the same buffers (no second cache:
            one layer's kept rows are copied at a time)."""
            n = len(keep)
            for layer in self.layers:
                for name in ("keys", "values"):
                    buf = getattr(layer, name)
                    buf[:n] = buf[keep]
                    setattr(layer, name, buf[:n])
            self.column = self.column[keep]
            self.row_index = self.row_index[:n]

    return StaticDecodeLayer, StaticDecodeCache


def static_decode_cache(prefilled, prompt_mask: torch.Tensor, capacity: int):
    """A StaticDecodeCache (module docstring) holding `prefilled`'s keys and values left-aligned, `capacity` slots
    per row."""
    return _cache_classes()[1](prefilled, prompt_mask, capacity)


class DecodeStep:
    """One decode step of `model` for every live row: feed each row's next token, get its next-token logits.

    Holds the step's inputs as fixed tensors (token [rows, 1], position [rows, 1], the cache's columns), so that on
    CUDA the step is captured once per row count (and width bucket on the SDPA path) as a CUDA graph and replayed;
    graphs=False runs an ordinary forward per step over exactly the slots in use. graphs=True off CUDA replays an
    `_EmulatedGraph` (tests: the same fixed-buffer protocol and width buckets, without CUDA). graphs=None: on CUDA.
    bucket: slots per width bucket on the SDPA path (None = WIDTH_BUCKET; tests use small ones). The model must be
    inside `decode_attention`.

    model: a transformers causal LM (peft wrapper allowed); cache: a StaticDecodeCache after the prompt;
    positions: the last prompt token's position per row [rows, 1]."""

    def __init__(self, model, cache, positions: torch.Tensor, graphs: bool | None = None, bucket: int | None = None):
        self.model, self.cache = model, cache
        device = positions.device
        self.position = positions.clone()
        self.token = torch.zeros(positions.shape[0], 1, dtype=torch.long, device=device)
        self.kv = cache_kwargs(model, cache)
        self.graphs = device.type == "cuda" if graphs is None else graphs
        bucket = WIDTH_BUCKET if bucket is None else bucket
        if bucket < 1:
            raise ValueError(f"bucket={bucket}; expected >= 1 slots")
        self.bucket = bucket
        layer = cache.layers[0]
        heads, kv_heads, head_dim = head_layout(model)
        if (kv_heads, head_dim) != tuple(layer.keys.shape[2:]):
            raise RuntimeError(f"the cache holds {tuple(layer.keys.shape[2:])} (KV heads, head dim); the model's "
                               f"attention says {(kv_heads, head_dim)}")
        self.path = attention_choice(device, layer.keys.dtype, heads, kv_heads, head_dim)[0]
        self.graph = None          # the graph of the current shape: _CudaGraph, or _EmulatedGraph off CUDA
        self.next_width = int(cache.column.max())  # host bound on the longest row: it counts the steps, no reads

    @property
    def rows(self) -> int:
        return self.token.shape[0]

    def _forward(self, token: torch.Tensor, position: torch.Tensor, width: int) -> torch.Tensor:
        c = self.cache
        lengths = (c.column + 1).to(torch.int32)
        if self.path == "flash":
            ar = torch.arange(self.rows + 1, device=token.device, dtype=torch.int32)
            batch = DecodeBatch(lengths, ar * c.capacity, ar, c.capacity, width, None, "flash")
        elif self.path == "triton":
            batch = DecodeBatch(lengths, None, None, c.capacity, width, None, "triton")
        else:
            mask = torch.arange(width, device=token.device)[None, :] < lengths[:, None]
            batch = DecodeBatch(lengths, None, None, c.capacity, width, mask[:, None, None, :], "sdpa")
        global _STEP_BATCH
        _STEP_BATCH = batch
        try:
            out = self.model(input_ids=token, position_ids=position, **self.kv, use_cache=True, logits_to_keep=1)
        finally:
            _STEP_BATCH = None
        return out.logits[:, -1]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 [rows], the token each row just sampled. Returns its next-token logits [rows, vocab] in
        the model's dtype; with graphs the tensor is the graph's output, overwritten by the next call.
        RuntimeError past the cache's capacity."""
        c = self.cache
        if self.next_width >= c.capacity:
            raise RuntimeError(f"decode step writes slot {self.next_width}: past the cache's capacity {c.capacity}")
        self.token.copy_(tokens[:, None])
        self.position.add_(1)
        width = self.next_width + 1  # the longest row's length after this step's token
        if not self.graphs:
            logits = self._forward(self.token, self.position, width)
        else:
            if self.path == "sdpa":  # the SDPA path reads `width` slots: fixed per graph, so bucketed
                width = min(c.capacity, -(-width // self.bucket) * self.bucket)
            shape = (self.rows, width if self.path == "sdpa" else c.capacity)
            if self.graph is None or self.graph.shape != shape:
                # the old graph and its private memory pool go first; each graph gets its own pool (a pool handle
                # shared with a deleted graph failed an allocator assert at the next capture_begin, torch 2.11)
                self.graph = None
                self.graph = (_CudaGraph if self.token.is_cuda else _EmulatedGraph)(self, shape)
            logits = self.graph.replay()
        c.column.add_(1)
        self.next_width += 1
        return logits

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (int64, ascending) in the cache and the step's inputs; the next call captures a
        graph for the new row count."""
        self.cache.keep_rows(keep)
        self.position, self.token = self.position[keep], self.token[keep]
        self.graph = None


@dataclass
class CaptureTotals:
    """Process-wide counts of the decode's CUDA graph captures (benchmarks read them): graphs captured and host
    seconds spent building them (eager run and capture; compiling included where it happens there)."""
    graphs: int = 0
    seconds: float = 0.0


CAPTURES = CaptureTotals()


class _CudaGraph:
    """The step's forward captured as a CUDA graph for one (rows, width). Built by running the step once eagerly on
    a side stream (torch's CUDA graph notes: lazy initialisation, and here compiling, outside the capture), then
    capturing it on the same stream; `replay` runs it and returns the graph's logits tensor. The eager run's writes
    (this step's K/V at the rows' columns) are the ones the replay makes again: replaying is idempotent.

    CUDAGraph.capture_begin/capture_end directly, not the torch.cuda.graph context: that one synchronises the
    device and empties the allocator's cache before every capture, so the GPU idled while the host captured and
    the sampler's [rows, vocab] buffers were allocated afresh after each of the decode's captures (one per
    compaction of finished rows). Each graph still gets its own memory pool."""

    def __init__(self, step: DecodeStep, shape: tuple[int, int]):
        t = time.perf_counter()
        self.shape = shape
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            step._forward(step.token, step.position, shape[1])
            self.graph.capture_begin()
            try:
                self.logits = step._forward(step.token, step.position, shape[1])
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        CAPTURES.graphs += 1
        CAPTURES.seconds += time.perf_counter() - t

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class _EmulatedGraph:
    """What a CUDA graph does, on any device: the step's tensors are fixed when it is built and every replay runs
    the forward on exactly those tensors, writing into one output tensor. A caller that swapped the step's token or
    position tensor instead of updating it in place (which a real graph would never see) gets stale results here
    too, and one that swapped a cache buffer (column, row_index, a layer's K or V) a RuntimeError, so CPU tests
    catch both. It cannot see a host read inside the forward, which a real capture refuses (the review tests spy
    for those)."""

    def __init__(self, step: DecodeStep, shape: tuple[int, int]):
        self.shape = shape
        self.step = step
        self.inputs = (step.token, step.position, shape[1])
        self.cache = (step.cache.column, step.cache.row_index, [(la.keys, la.values) for la in step.cache.layers])
        self.logits = None

    def replay(self) -> torch.Tensor:
        c = self.step.cache
        if c.column is not self.cache[0] or c.row_index is not self.cache[1] or any(
                la.keys is not k or la.values is not v for la, (k, v) in zip(c.layers, self.cache[2])):
            raise RuntimeError("a buffer the graph was built on was replaced: a CUDA graph would not see it")
        out = self.step._forward(*self.inputs)
        if self.logits is None:
            self.logits = out.clone()
        else:
            self.logits.copy_(out)
        return self.logits
