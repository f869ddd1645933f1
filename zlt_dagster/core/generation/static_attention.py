"""The static decode's attention (issue 17): one new token per row over a StaticDecodeCache (static_decode.py),
each row reading only the slots it has filled, registered with transformers' AttentionInterface.

`decode_attention_forward`, for one new token per row, takes one of three paths (`attention_choice`):
  - on CUDA where Triton builds kernels, our Triton kernel (decode_kernel.py): one program per (row, KV head), the
    KV head's query heads in one small tile, each row reading exactly its filled slots;
  - else on CUDA (bf16/fp16, Ampere or newer), torch's flash-attention varlen kernel with `seqused_k`: each row
    reads exactly its filled slots, the KV heads natively shared by their query heads (no repeat, no mask);
  - elsewhere (CPU, and where both are missing or disagree with SDPA in a start-up probe): SDPA over the first
    `width` slots with a length mask, the query viewed as [rows, kv_heads, heads/kv_heads, d] so that a KV head's
    query heads are rows of one problem over it (K/V read once, nothing repeated); the decode step rounds `width`
    up to static_decode.WIDTH_BUCKET so that a captured graph serves 128 steps.
The function gets the step's lengths from the DecodeStep forward in progress (`step_batch`), not as a forward
keyword as packed training does (core/packing.py): some models' decoder layers drop forward keywords (StableLm,
Nemotron). No attention mask goes to the model, so transformers builds none (masking_utils returns None for an
attention function without a registered mask function).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from ... import settings
from ..models import error_gist, text_config, unwrap_peft

DECODE_ATTENTION = "zlt_decode_attention"
# ZLT_DECODE_ATTENTION picks the path on CUDA (benchmarks compare them): auto = the Triton kernel where its probe
# passes, else flash where its probe passes, else SDPA; triton / flash = that kernel where its probe passes, else
# SDPA; sdpa = SDPA (read through settings.decode_attention at each decode)
ATTENTION_ENV = "ZLT_DECODE_ATTENTION"
# the DecodeBatch of the DecodeStep forward in progress (set around the model call by `step_batch`, also while a
# CUDA graph is captured): what decode_attention_forward reads (a forward keyword would not reach it through every
# model's decoder layers: StableLm drops them)
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


def batch_for(path: str, lengths: torch.Tensor, capacity: int, width: int) -> DecodeBatch:
    """The DecodeBatch `path` reads, for rows of `lengths` (int32 [rows], device tensors: built inside a captured
    forward, nothing read back) in a cache of `capacity` slots per row, `width` of them read by the SDPA path."""
    if path == "flash":
        ar = torch.arange(len(lengths) + 1, device=lengths.device, dtype=torch.int32)
        return DecodeBatch(lengths, ar * capacity, ar, capacity, width, None, path)
    mask = None
    if path == "sdpa":
        mask = (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None])[:, None, None, :]
    return DecodeBatch(lengths, None, None, capacity, width, mask, path)


@contextlib.contextmanager
def step_batch(batch: DecodeBatch) -> Iterator[None]:
    """`batch` is the one decode_attention_forward reads for the duration (a DecodeStep's forward)."""
    global _STEP_BATCH
    _STEP_BATCH = batch
    try:
        yield
    finally:
        _STEP_BATCH = None


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


def _refused(path: str, device: torch.device, dtype: torch.dtype, dtypes: tuple) -> str | None:
    """Why `path`'s kernel is not tried here before any probe (None = try it): ZLT_DECODE_ATTENTION names another
    path, not CUDA or not one of `dtypes`, compute capability < 8.0 (both kernels' bf16 tensor-core code).
    settings.SettingsError for a bad ZLT_DECODE_ATTENTION."""
    setting = settings.decode_attention()
    if setting not in ("auto", path):
        return f"{ATTENTION_ENV}={setting}"
    if device.type != "cuda" or dtype not in dtypes:
        return f"{device.type} {dtype}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "compute capability < 8.0"
    return None


def flash_decode_check(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                       head_dim: int) -> tuple[bool, str]:
    """(whether the flash path runs here, why not). It needs CUDA, bf16/fp16, compute capability >= 8.0, not
    switched off (ZLT_DECODE_ATTENTION=sdpa or triton), and a probe (3 rows of different lengths, this head layout)
    that agrees with the SDPA path (_probe: 2e-2 in 16-bit); a torch whose flash kernel lacks `seqused_k` fails the
    probe with its error. Kept per (device, dtype, heads, kv_heads, d). settings.SettingsError for a bad
    ZLT_DECODE_ATTENTION."""
    why = _refused("flash", device, dtype, (torch.bfloat16, torch.float16))
    if why:
        return False, why
    return _probed("flash", device, dtype, heads, kv_heads, head_dim)


def triton_decode_check(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                        head_dim: int) -> tuple[bool, str]:
    """(whether our Triton kernel runs here, why not). It needs CUDA (compute capability >= 8.0: bf16 tl.dot),
    Triton importable, a C compiler and Python.h (Triton builds a launcher per kernel:
    compiled_layers.can_build_triton_kernels), not switched off (ZLT_DECODE_ATTENTION=sdpa or flash), and a probe
    (3 rows of different lengths, this head layout) that agrees with the SDPA path (_probe: 2e-2 in 16-bit, 1e-4 in
    fp32); a kernel that fails to build fails the probe with its error. Kept per (device, dtype, heads, kv_heads,
    d). settings.SettingsError for a bad ZLT_DECODE_ATTENTION."""
    import importlib.util  # here: only this check asks

    from ..compiled_layers import can_build_triton_kernels  # here: compiled_layers imports this package's parent

    why = _refused("triton", device, dtype, (torch.bfloat16, torch.float16, torch.float32))
    if why:
        return False, why
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
    ref = _sdpa(q, k, v, batch_for("sdpa", lengths, capacity, capacity), d ** -0.5).float()
    try:
        out = {"triton": _triton, "flash": _flash}[path](
            q, k, v, batch_for(path, lengths, capacity, capacity), d ** -0.5).float()
    except torch.OutOfMemoryError:
        raise  # not a property of the kernel: the decode would not fit either
    except Exception as e:  # noqa: BLE001 - kept as the reason (recorded in every decode's record): the kernel
        # cannot run here (a torch whose flash lacks seqused_k: RuntimeError; Triton failing to build or launch
        # raises its own classes), and the decode takes the next path
        return False, f"{path} probe failed: {type(e).__name__}: {error_gist(e)}"
    err = float((out - ref).abs().max())
    # fp32: both compute in fp32 (differences ~1e-6; TF32 products would be ~1e-3 off); 16-bit: output rounding
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    return (True, "") if err <= tolerance else (False, f"{path} probe differs from SDPA by {err:.3g}")


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
