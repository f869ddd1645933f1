"""Packed training batches: a micro-batch's examples as ONE row of real tokens, no padding through the model.

Why: a micro-batch padded to its longest example spends the linear layers, the LoRA adapters and their dropout
on padding: for the paper's on-policy lengths (~N(370, 120) tokens) ~35% of a 16-example forward's token slots
(BENCHMARKS.md, issue 18). Packed, every token slot is a real token; only attention, which must not cross
examples, runs on a padded grid (the "unpad" scheme of padding-free transformer training, e.g. HF's
DataCollatorWithFlattening + varlen attention): q, k and v are scattered into a [examples x width] grid right
before SDPA and the output gathered back, so SDPA sees exactly the right-padded causal batch it saw before, and
a real token attends to the same keys of its own example as before (right padding under a causal mask is never
read by a real position). Exact: the loss and every gradient equal the padded batch's
(tests/core/test_train.py::test_packed_batch_equals_padded_batch, float64).

On CUDA in bf16/fp16 (eager or compiled), attention runs on the packed row itself instead: torch's variable-length flash
attention (`torch.nn.attention.varlen.varlen_attn`, causal, one segment per example: what flash-attn's
`flash_attn_varlen_func` does for HF's padding-free training) with no grid at all; the grid path is the
reference it is checked against (benchmarks/train_bench.py --packing-check) and what the CPU runs. The max
length varlen needs is the grid's width (a tensor's shape: symbolic under torch.compile, no recompile per
micro-batch).

How it plugs in: transformers' documented `AttentionInterface` (a registered attention function, selected with
`set_attn_implementation`); the packing travels to it as a forward keyword argument (`zlt_pack`), which
transformers passes through the decoder layers to the attention function. A custom attention name also makes
transformers skip building a causal mask (masking_utils: no mask function is registered for it).
RoPE positions restart at 0 for each example (`position_ids`), as in the padded batch. Sliding-window layers
(Mistral, Qwen2 with use_sliding_window) keep their window: a band mask on the grid, window_size= for varlen.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .masking import IGNORE
from .models import to_device_async

PACKED_ATTENTION = "zlt_packed_sdpa"


@dataclass
class PackedBatch:
    """One micro-batch packed. Shapes: input_ids, labels, position_ids int64 [1, T] (T = the examples' tokens,
    plus trailing padding up to a multiple or a static shape when asked, in segments and grid rows of its own);
    dest int64 [T]: where packed token t sits in the row-major [rows, width] attention grid; grid: an empty
    [rows, width, 0] tensor that carries the grid's shape (a tensor, not ints, so torch.compile keeps it symbolic
    instead of recompiling per micro-batch); cu_seqlens int32 [rows + 1]: where each grid row's tokens start in the
    packed row, and the end (flash attention's varlen convention; a static shape adds empty segments at the end).
    labels are IGNORE at each example's first position (it has no predecessor in its example: in the packed row it
    would be the "next token" of the previous one).

    The loss reads the supervised positions from host-built indices instead of searching the labels on the device
    (a `nonzero` is a host sync, and a CUDA graph cannot hold one): sup_pos int64 [S], the positions t whose next
    token labels[t + 1] is supervised, sup_target int64 [S] those tokens (a static shape pads both with position 0
    and IGNORE, which adds 0 to the loss); step_supervised int64 [1], the supervised tokens of the whole optimizer
    step this micro-batch belongs to (the loss divisor). The int64 fields are views into one buffer `flat`, so a
    batch moves to the device, or into a captured graph's inputs, in one copy."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    dest: torch.Tensor
    grid: torch.Tensor
    cu_seqlens: torch.Tensor
    lengths: list[int]
    sup_pos: torch.Tensor | None = None
    sup_target: torch.Tensor | None = None
    step_supervised: torch.Tensor | None = None
    flat: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def real_tokens(self) -> int:
        """Tokens of the examples (without any padding)."""
        return sum(self.lengths)

    def empty_like(self) -> "PackedBatch":
        """A batch of this one's shape with tensors of its own, contents undefined (a CUDA graph's inputs, filled
        with load_)."""
        return _batch(torch.empty_like(self.flat), torch.empty_like(self.cu_seqlens), torch.empty_like(self.grid),
                      list(self.lengths), self.tokens, int(self.sup_pos.shape[0]))

    def load_(self, other: "PackedBatch") -> None:
        """Copy `other` (same static shape) into this batch's tensors in place: what a captured graph's inputs
        need. Raises ValueError on another shape."""
        if self.flat is None or other.flat is None or self.flat.shape != other.flat.shape \
                or self.input_ids.shape != other.input_ids.shape or self.sup_pos.shape != other.sup_pos.shape \
                or self.cu_seqlens.shape != other.cu_seqlens.shape or self.grid.shape != other.grid.shape:
            raise ValueError(f"load_ needs two batches of one static shape: {self.tokens} tokens, "
                             f"{self.sup_pos.shape[0]} supervised slots, grid {tuple(self.grid.shape[:2])} against "
                             f"{other.tokens}, {other.sup_pos.shape[0]}, {tuple(other.grid.shape[:2])}")
        self.flat.copy_(other.flat, non_blocking=True)
        self.cu_seqlens.copy_(other.cu_seqlens, non_blocking=True)
        self.lengths = list(other.lengths)


@dataclass(frozen=True)
class StaticShape:
    """A packed micro-batch's fixed shape (core/train_graphs.py captures one CUDA graph per shape): `tokens` token
    slots, `supervised` supervised-position slots, `segments` attention segments (cu_seqlens has segments + 1
    entries), `width` the grid's width (the longest segment allowed; varlen's max length)."""
    tokens: int
    supervised: int
    segments: int
    width: int


def supervised_count(example) -> int:
    """Supervised positions of an example in a packed row (its first label never is: see PackedBatch)."""
    return sum(1 for y in example.labels[1:] if y != IGNORE)


def collate_packed(examples: Sequence, pad_id: int, device, multiple: int = 1, shape: StaticShape | None = None,
                   step_supervised: int = 0) -> PackedBatch:
    """Pack `examples` (TokenizedExample: input_ids, labels) into one row. `multiple` > 1 rounds the row's
    length and the grid's width up to a multiple of it (torch.compile's SDPA graph guards on alignment); the
    extra tokens are pad ids with IGNORE labels in a grid row of their own. `shape` instead fixes every size
    (StaticShape): the padding then fills shape.tokens in segments of at most shape.width tokens, and empty
    segments fill shape.segments. step_supervised: the loss divisor stored with the batch (PackedBatch).
    Host tensors are pinned on CUDA, and the whole batch moves in two non-blocking copies (no host sync).
    Raises ValueError on no examples, an example without tokens, or examples that do not fit `shape`."""
    if not examples:
        raise ValueError("a packed batch needs at least one example")
    lengths = [len(e.input_ids) for e in examples]
    if min(lengths) < 1:
        raise ValueError(f"example {lengths.index(min(lengths))} of the micro-batch has no tokens")
    segments = [(list(e.input_ids), [IGNORE] + list(e.labels[1:])) for e in examples]
    if shape is None:
        extra = -sum(lengths) % multiple
        width = -(-max(lengths + [extra]) // multiple) * multiple
        pads = [extra] if extra else []
    else:
        extra, width = shape.tokens - sum(lengths), shape.width
        pads = [width] * (extra // width) + ([extra % width] if extra % width else [])
        if extra < 0 or max(lengths) > width or len(segments) + len(pads) > shape.segments:
            raise ValueError(f"{len(lengths)} examples of {sum(lengths)} tokens (longest {max(lengths)}) do not fit "
                             f"the static shape {shape}")
    # the examples, then the padding as segments (and grid rows) of their own
    segments += [([pad_id] * n, [IGNORE] * n) for n in pads]
    ids, labels, positions, dest, starts = [], [], [], [], [0]
    for row, (seg_ids, seg_labels) in enumerate(segments):
        n = len(seg_ids)
        ids.extend(seg_ids)
        labels.extend(seg_labels)
        positions.extend(range(n))
        dest.extend(range(row * width, row * width + n))
        starts.append(starts[-1] + n)
    rows = len(segments) if shape is None else shape.segments
    starts += [starts[-1]] * (rows + 1 - len(starts))   # empty segments: attention does nothing there
    sup_pos = [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE]
    sup_target = [labels[t + 1] for t in sup_pos]
    if shape is not None:
        if len(sup_pos) > shape.supervised:
            raise ValueError(f"{len(sup_pos)} supervised positions do not fit the static shape {shape}")
        pad_sup = shape.supervised - len(sup_pos)
        sup_pos, sup_target = sup_pos + [0] * pad_sup, sup_target + [IGNORE] * pad_sup
    t, s = len(ids), len(sup_pos)
    host = torch.tensor(ids + labels + positions + dest + sup_pos + sup_target + [step_supervised], dtype=torch.long)
    cu = torch.tensor(starts, dtype=torch.int32)
    flat, cu = to_device_async(host, device), to_device_async(cu, device)  # no wait for the GPU's queue
    return _batch(flat, cu, torch.empty((rows, width, 0), device=flat.device), lengths, t, s)


def _batch(flat: torch.Tensor, cu: torch.Tensor, grid: torch.Tensor, lengths: list[int], t: int, s: int
           ) -> PackedBatch:
    """The PackedBatch whose int64 fields are views into `flat`: input_ids, labels, position_ids, dest [t] each,
    sup_pos, sup_target [s] each, step_supervised [1] (the layout collate_packed writes)."""
    parts = flat.split([t, t, t, t, s, s, 1])
    return PackedBatch(parts[0].view(1, t), parts[1].view(1, t), parts[2].view(1, t), parts[3], grid, cu, lengths,
                       sup_pos=parts[4], sup_target=parts[5], step_supervised=parts[6], flat=flat)


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        zlt_pack: tuple | None = None, **kwargs):
    """transformers attention function (AttentionInterface signature) over packed rows. query [b, heads, T, d],
    key/value [b, kv heads, T, d] with b = packed rows (one per cell block); zlt_pack as from `model_kwargs`.
    Returns ([b, T, heads, d], None), what transformers' own sdpa function returns. Raises RuntimeError without
    zlt_pack, or with a mask (packing is for training forwards only)."""
    if zlt_pack is None:
        raise RuntimeError(f"attention '{PACKED_ATTENTION}' needs zlt_pack= (a PackedBatch's dest and grid); "
                           "the model is still in packed-training mode")
    if attention_mask is not None:
        raise RuntimeError("packed attention takes no attention mask: the grid is the mask")
    # sliding-window layers (Mistral, Qwen2 with use_sliding_window, ...) pass their window: a query sees the last
    # `window` keys of its example, itself included (transformers' sliding_window_overlay). Only where an example
    # can be longer than the window does it change anything
    window = kwargs.pop("sliding_window", None)
    if window is not None and not zlt_pack[1].shape[1] > window:
        window = None
    if use_varlen(query, dropout, window):
        return varlen_forward(query, key, value, zlt_pack, scaling, window), None
    return grid_forward(module, query, key, value, zlt_pack, dropout, scaling, window=window, **kwargs), None


def grid_forward(module, query, key, value, zlt_pack: tuple, dropout: float = 0.0, scaling: float | None = None,
                 window: int | None = None, **kwargs) -> torch.Tensor:
    """Attention per example through transformers' sdpa function on the right-padded [b x rows, width] grid;
    [b, T, heads, d]. window: a sliding window (each query sees its last `window` keys), as an explicit causal
    band mask; None = plain causal."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dest, grid = zlt_pack[0], zlt_pack[1]
    b = query.shape[0]
    rows, width = grid.shape[0], grid.shape[1]

    def to_grid(t: torch.Tensor) -> torch.Tensor:  # [b, h, T, d] -> [b x rows, h, width, d], zeros where no token
        tokens = t.transpose(1, 2)                                               # [b, T, h, d]
        padded = tokens.new_zeros((b, rows * width, *tokens.shape[2:])).index_copy(1, dest, tokens)
        return padded.view(b * rows, width, *tokens.shape[2:]).transpose(1, 2)

    mask = None
    if window is not None:  # causal and within the window: key j <= query i and i - j < window
        pos = torch.arange(width, device=query.device)
        gap = pos[:, None] - pos[None, :]
        mask = ((gap >= 0) & (gap < window))[None, None]
    if rows == 1 and not torch.compiler.is_compiling():
        # one example and no alignment row: the grid IS the packed row (dest = 0..T-1): no copies (single-example
        # micro-batches are common: the CPU demo's 25-cell forwards, the memory probe)
        out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                        is_causal=True, **kwargs)
        return out
    out, _ = sdpa_attention_forward(module, to_grid(query), to_grid(key), to_grid(value), mask, dropout=dropout,
                                    scaling=scaling, is_causal=True, **kwargs)   # [b x rows, width, h, d]
    return out.reshape(b, rows * width, *out.shape[2:]).index_select(1, dest)


@functools.cache
def _varlen_api() -> tuple | None:
    """(varlen_attn, its keyword names) when this torch has the public varlen API, else None. Its signature
    moved between releases (2.10: is_causal=; 2.11+: window_size=(-1, 0) for causal, scale=; 2.12+: enable_gqa=),
    so the call is built from what this version takes."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10: the grid path
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.cache
def _flash_capable(device_index: int | None) -> bool:
    """Whether this GPU runs torch's flash attention kernels (varlen_attn calls them directly): Ampere (sm80) or
    newer; older GPUs (V100, T4) raise "FlashAttention only supports Ampere GPUs or newer" and take the grid."""
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def use_varlen(query: torch.Tensor, dropout: float = 0.0, window: int | None = None) -> bool:
    """Whether packed attention runs as varlen flash attention: CUDA on Ampere or newer, bf16/fp16, no attention
    dropout, and a sliding window only where this torch's varlen_attn takes one (window_size=). Also under
    torch.compile: varlen_attn is a custom op, and its max length is the grid's width, symbolic under
    dynamic=True (measured on the H200, torch 2.11: one graph for two widths, no graph break)."""
    return (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and dropout == 0.0
            and _varlen_api() is not None
            and (window is None or "window_size" in _varlen_api()[1]) and _flash_capable(query.device.index))


def varlen_forward(query, key, value, zlt_pack: tuple, scaling: float | None, window: int | None = None
                   ) -> torch.Tensor:
    """Causal flash attention over the packed rows, one segment per example (cu_seqlens of all b rows, zlt_pack's
    third item); [b, T, heads, d]. window: a sliding window (window_size=(window - 1, 0): the left reach transformers'
    flash path gives it). Raises RuntimeError where this torch's varlen_attn cannot take the scale or the window."""
    fn, names = _varlen_api()
    cu, max_len = zlt_pack[2], zlt_pack[1].shape[1]
    b, heads, t, d = query.shape
    q = query.transpose(1, 2).reshape(b * t, heads, d)           # views of transformers' [b, T, h, d] projections
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    if window is not None:
        if "window_size" not in names:
            raise RuntimeError("this torch's varlen_attn has no window_size=; a sliding window needs the grid path")
        kw = {"window_size": (window - 1, 0)}
    else:
        kw = {"is_causal": True} if "is_causal" in names else {"window_size": (-1, 0)}
    if scaling is not None:
        if "scale" in names:
            kw["scale"] = scaling
        elif abs(scaling - d ** -0.5) > 1e-12:
            raise RuntimeError(f"this torch's varlen_attn has no scale= and the model's attention scale {scaling} "
                               f"is not 1/sqrt({d})")
    if key.shape[1] != heads:  # grouped-query attention: each kv head serves heads / kv heads query heads
        if "enable_gqa" in names:
            kw["enable_gqa"] = True
        else:  # transformers' own repeat_kv, as its sdpa path does
            from transformers.integrations.sdpa_attention import repeat_kv

            g = heads // key.shape[1]
            k = repeat_kv(key, g).transpose(1, 2).reshape(b * t, heads, d)
            v = repeat_kv(value, g).transpose(1, 2).reshape(b * t, heads, d)
    out = fn(q, k, v, cu, cu, max_len, max_len, **kw)
    return out.view(b, t, heads, d)


def model_kwargs(batch: PackedBatch, k: int) -> dict:
    """Forward keyword arguments of `batch` repeated for k cell blocks (rows [k, T]); zlt_pack = (dest, grid,
    cu_seqlens of all k rows)."""
    t = batch.tokens
    cu = batch.cu_seqlens
    if k > 1:  # row r's segments start r*T further on
        offsets = torch.arange(k, device=cu.device, dtype=cu.dtype)[:, None] * t
        cu = torch.cat([(cu[None, :-1] + offsets).flatten(), cu.new_full((1,), k * t)])
    return {"input_ids": batch.input_ids.repeat(k, 1), "position_ids": batch.position_ids.expand(k, -1),
            "zlt_pack": (batch.dest, batch.grid, cu)}


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_forward)


def is_packed(model: torch.nn.Module) -> bool:
    return getattr(model.config, "_attn_implementation", None) == PACKED_ATTENTION


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """For the duration, `model` (a transformers model using the AttentionInterface, e.g. Llama, Qwen2) runs its
    attention through `packed_sdpa_forward`; its previous implementation is restored on exit. Raises
    RuntimeError for a model that cannot switch attention functions or has no SDPA support (e.g. Gemma2)."""
    previous = model.config._attn_implementation
    if previous == PACKED_ATTENTION:
        yield
        return
    _register()
    if not model._can_set_attn_implementation():
        raise RuntimeError(f"{type(model).__name__} does not use transformers' AttentionInterface; packed training "
                           "needs it")
    try:
        model.set_attn_implementation(PACKED_ATTENTION)
    except ValueError as e:  # transformers checks SDPA support for an "sdpa" name: Gemma2 (soft-capping) has none
        raise RuntimeError(f"{type(model).__name__} cannot train with packed attention, which runs transformers' "
                           f"sdpa per example: {str(e).splitlines()[0][:200]}") from e
    model._zlt_unpacked_attention = previous
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        del model._zlt_unpacked_attention


@contextlib.contextmanager
def unpacked_attention(model: torch.nn.Module) -> Iterator[None]:
    """Inside `packed_attention`: the model's own attention again for the duration (e.g. while a finished cell's
    adapter is saved, when a caller's code may run ordinary forwards); packed again afterwards. Outside it: no-op."""
    previous = getattr(model, "_zlt_unpacked_attention", None)
    if previous is None or not is_packed(model):
        yield
        return
    model.set_attn_implementation(previous)
    try:
        yield
    finally:
        model.set_attn_implementation(PACKED_ATTENTION)
