"""A decode step without host overhead (issue 17, item 3): a preallocated KV cache, GQA attention that reads each
KV head once, and, on CUDA, the whole step replayed as one CUDA graph.

Why (profile arithmetic of the loop before, SmolLM2-135M, 2,200 rows, context ~300 of <= 582 tokens):
  * transformers' DynamicCache grows by torch.cat: every step copies the whole cache (read + write, 2x its size);
  * with a padding mask, transformers' sdpa cannot pass enable_gqa (torch's flash kernel takes no mask) and calls
    repeat_kv: K and V are written out once per query head (SmolLM2: 9 heads over 3 KV heads, 3x the cache;
    Qwen2.5-7B: 7x) and read back by the masked kernel: ~9 cache sizes of memory traffic per step (~14 GB, ~30 ms);
  * ~2,100 kernel launches per step (30 layers x norms, rotary, projections, peft's LoRA, residuals): the host
    needs ~20 ms to issue them.
What this module does instead:
  * `StaticDecodeCache`: one [rows, kv_heads, capacity, head_dim] buffer per layer, written in place at the current
    column (index_copy_ with a device-side column, so a CUDA graph can replay it); attention reads a view of the
    first `width` columns, `width` rounded up to WIDTH_BUCKET so that a captured graph serves 128 steps;
  * `decode_sdpa_forward`, registered with transformers' AttentionInterface: a decode query [rows, heads, 1, d] is
    viewed as [rows, kv_heads, heads/kv_heads, d], so the grouped query heads of one KV head are rows of one SDPA
    problem over that KV head: K/V are read once, nothing is repeated (exact: the same dot products and softmax);
  * a padding + causal mask as a preallocated bool [rows, 1, 1, capacity] tensor (True = attend), passed to the
    model as a ready 4D mask (transformers' masking_utils returns a 4D mask as it is), one column switched on per
    step inside the graph;
  * `DecodeStep`: on CUDA, the model's forward for one token per row captured as a CUDA graph (torch.cuda.graph)
    per (rows, width bucket) and replayed; the host then issues one replay per step instead of ~2,100 launches.
    Rows leaving the batch (sampling.py's compaction) move to the front of the same buffers and the graph is
    captured again for the smaller batch.
Models with sliding-window layers or attention soft-capping keep the DynamicCache loop (`unsupported_reason`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..models import unwrap_peft

DECODE_ATTENTION = "zlt_decode_sdpa"
# Columns of the cache a captured graph attends over, rounded up to a multiple of this: one capture per 128 steps.
# Smaller buckets read fewer masked columns (on average half a bucket per step: 64 x 23 KB per row on SmolLM2, ~3%
# of a 512-token answer's cache), larger ones capture fewer graphs (each capture costs one eager step's host time).
WIDTH_BUCKET = 128


def decode_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """transformers attention function (AttentionInterface signature) for ONE new token per row.

    query [rows, heads, 1, d]; key, value [rows, kv_heads, width, d] (heads a multiple of kv_heads, query head h
    uses KV head h // (heads / kv_heads), transformers' repeat_kv order); attention_mask bool [rows, 1, 1, width],
    True = attend. Returns ([rows, 1, heads, d], None) as transformers' sdpa_attention_forward does.
    Raises RuntimeError for more than one query position, a sliding window, soft-capping or attention sinks (the
    decode loop only uses it for models without them, see `unsupported_reason`)."""
    rows, heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    if q_len != 1:
        raise RuntimeError(f"decode attention takes one query position per row, got {q_len}")
    if sliding_window is not None or softcap is not None or s_aux is not None:
        raise RuntimeError("decode attention has no sliding window, soft-capping or attention sinks")
    if attention_mask is None or attention_mask.dtype != torch.bool:
        raise RuntimeError("decode attention needs the decode loop's bool mask [rows, 1, 1, width]")
    # the g = heads / kv_heads query heads of KV head j are heads j*g .. j*g+g-1: one [g, d] query block per KV head
    q = query.reshape(rows, kv_heads, heads // kv_heads, d)  # a copy only where rotary left it strided
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    # the CUDA kernels return [rows, kv_heads, g, d] in [rows, g, kv_heads, d] memory: reshape copies there
    return out.reshape(rows, heads, 1, d).transpose(1, 2), None


def unsupported_reason(model) -> str | None:
    """Why `model` cannot decode with this module (None = it can): it must switch attention functions through
    transformers' AttentionInterface, and use full causal attention in every layer without soft-capping."""
    base = unwrap_peft(model)
    cfg = base.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
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
    return None


@contextlib.contextmanager
def decode_attention(model) -> Iterator[None]:
    """For the duration, `model` (peft wrapper looked through) attends with `decode_sdpa_forward`; its previous
    attention implementation is restored on exit, also after an error."""
    from transformers import AttentionInterface

    base = unwrap_peft(model)
    previous = base.config._attn_implementation
    AttentionInterface.register(DECODE_ATTENTION, decode_sdpa_forward)
    base.set_attn_implementation(DECODE_ATTENTION)
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


def _cache_classes():
    """StaticDecodeCache and its layer, built on first use: transformers is imported lazily, as elsewhere in core."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class StaticDecodeLayer(CacheLayerMixin):
        """One layer's K and V: [rows, kv_heads, capacity, d] buffers, written at the cache's column, read as
        the first `width` columns."""
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
            o = self.owner
            self.keys.index_copy_(2, o.column, key_states)
            self.values.index_copy_(2, o.column, value_states)
            return self.keys[:, :, :o.width], self.values[:, :, :o.width]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.owner.width, 0

        def get_seq_length(self) -> int:
            return self.owner.width

        def get_max_length(self) -> int:
            return self.keys.shape[2]

    class StaticDecodeCache(Cache):
        """KV cache of the decode loop (module docstring). `column` (int64 [1], on the device) is where the next
        token's K/V go; `width` (int) how many columns attention reads; rows are the buffers' first dimension."""

        def __init__(self, prefilled, capacity: int):
            """prefilled: a transformers cache after the prompt's forward (every layer [rows, kv_heads, prompt, d]);
            capacity: columns to hold (prompt + new tokens). Its tensors are copied; it can be dropped afterwards."""
            layers = []
            for layer in prefilled.layers:
                k, v = layer.keys, layer.values
                if k is None or k.dim() != 4:
                    raise RuntimeError(f"prefilled cache layer {type(layer).__name__} has no [rows, heads, len, d] keys")
                if k.shape[2] > capacity:
                    raise ValueError(f"capacity {capacity} < prompt width {k.shape[2]}")
                bk = k.new_zeros(k.shape[0], k.shape[1], capacity, k.shape[3])
                bv = v.new_zeros(v.shape[0], v.shape[1], capacity, v.shape[3])
                bk[:, :, :k.shape[2]] = k
                bv[:, :, :v.shape[2]] = v
                layers.append(StaticDecodeLayer(self, bk, bv))
            super().__init__(layers=layers)
            prompt = prefilled.layers[0].keys.shape[2]
            self.column = torch.tensor([prompt], device=layers[0].keys.device)
            self.width = prompt

        def keep_rows(self, keep: torch.Tensor) -> None:
            """Keep only rows `keep` (int64, ascending), moved to the front of the same buffers (no second cache:
            one layer's kept rows are copied at a time); columns past the ones in use are not copied."""
            n, w = len(keep), self.width
            for layer in self.layers:
                for name in ("keys", "values"):
                    buf = getattr(layer, name)
                    buf[:n, :, :w] = buf[keep, :, :w]
                    setattr(layer, name, buf[:n])

    return StaticDecodeLayer, StaticDecodeCache


def static_decode_cache(prefilled, capacity: int):
    """A StaticDecodeCache (module docstring) holding `prefilled`'s keys and values, `capacity` columns wide."""
    return _cache_classes()[1](prefilled, capacity)


class DecodeStep:
    """One decode step of `model` for every live row: feed each row's next token, get its next-token logits.

    Holds the step's inputs as fixed tensors (token [rows, 1], position [rows, 1], mask [rows, 1, 1, capacity]),
    so that on CUDA the step is captured once per (rows, width bucket) as a CUDA graph and replayed; graphs=False
    runs an ordinary forward per step over exactly the columns in use. graphs=True off CUDA replays an
    `_EmulatedGraph` (tests: the same fixed-buffer protocol and width buckets, without CUDA). graphs=None: on CUDA.
    bucket: columns per width bucket (None = WIDTH_BUCKET; tests use small ones). The model must be inside
    `decode_attention`.

    model: a transformers causal LM (peft wrapper allowed); cache: a StaticDecodeCache after the prompt; mask: the
    prompt's attention mask [rows, prompt] (1 = token, 0 = left padding); positions: the last prompt token's
    position per row [rows, 1]."""

    def __init__(self, model, cache, mask: torch.Tensor, positions: torch.Tensor, graphs: bool | None = None,
                 bucket: int | None = None):
        from .sampling import cache_kwargs

        self.model, self.cache = model, cache
        rows, prompt = mask.shape
        capacity = cache.layers[0].keys.shape[2]
        device = mask.device
        self.mask = torch.zeros(rows, 1, 1, capacity, dtype=torch.bool, device=device)
        self.mask[:, 0, 0, :prompt] = mask.bool()
        self.position = positions.clone()
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.kv = cache_kwargs(model, cache)
        self.graphs = device.type == "cuda" if graphs is None else graphs
        bucket = WIDTH_BUCKET if bucket is None else bucket
        if bucket < 1:
            raise ValueError(f"bucket={bucket}; expected >= 1 columns")
        self.bucket = bucket
        self.graph = None          # the graph of the current (rows, width): _CudaGraph, or _EmulatedGraph off CUDA
        self.captures = 0
        self.next_column = prompt  # the host's copy of cache.column: it counts the steps, no device read

    @property
    def rows(self) -> int:
        return self.token.shape[0]

    def _forward(self, token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        mask.index_fill_(3, self.cache.column, True)  # the column this step writes (idempotent: replays may repeat)
        out = self.model(input_ids=token, attention_mask=mask, position_ids=position, **self.kv, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 [rows], the token each row just sampled. Returns its next-token logits [rows, vocab] in
        the model's dtype; with graphs the tensor is the graph's output, overwritten by the next call.
        RuntimeError past the cache's capacity."""
        c = self.cache
        capacity = c.layers[0].keys.shape[2]
        if self.next_column >= capacity:
            raise RuntimeError(f"decode step at column {self.next_column}: past the cache's capacity {capacity}")
        self.token.copy_(tokens[:, None])
        self.position.add_(1)
        if not self.graphs:
            c.width = self.next_column + 1
            logits = self._forward(self.token, self.mask[:, :, :, :c.width], self.position)
        else:
            width = min(capacity, -(-(self.next_column + 1) // self.bucket) * self.bucket)
            if self.graph is None or self.graph.shape != (self.rows, width):
                c.width = width
                # the old graph and its private memory pool go first; each graph gets its own pool (a pool handle
                # shared with a deleted graph fails an allocator assert in torch 2.11 at the next capture_begin)
                self.graph = None
                self.graph = (_CudaGraph if self.token.is_cuda else _EmulatedGraph)(self, width)
                self.captures += 1
            logits = self.graph.replay()
        c.column.add_(1)
        self.next_column += 1
        return logits

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (int64, ascending) in the cache and the step's inputs; the next call captures a
        graph for the new row count."""
        self.cache.keep_rows(keep)
        self.mask, self.position, self.token = self.mask[keep], self.position[keep], self.token[keep]
        self.graph = None


class _CudaGraph:
    """The step's forward captured as a CUDA graph for the current rows and width (torch.cuda.graph). Built by
    running the step once eagerly on a side stream (as torch's CUDA graph notes ask: lazy initialisation outside
    the capture) and then capturing it; `replay` runs it and returns the graph's logits tensor. The eager run's
    writes (this step's K/V, its mask column) are the same ones the replay makes: replaying is idempotent."""

    def __init__(self, step: DecodeStep, width: int):
        self.shape = (step.rows, width)
        inputs = (step.token, step.mask[:, :, :, :width], step.position)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step._forward(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step._forward(*inputs)

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class _EmulatedGraph:
    """What a CUDA graph does, on any device: the step's tensors are fixed when it is built and every replay runs
    the forward on exactly those tensors, writing into one output tensor. A caller that swapped a buffer instead of
    updating it in place (which a real graph would never see) gets stale results here too, so CPU tests catch it."""

    def __init__(self, step: DecodeStep, width: int):
        self.shape = (step.rows, width)
        self.step, self.width = step, width
        self.inputs = (step.token, step.mask[:, :, :, :width], step.position)
        self.logits = None

    def replay(self) -> torch.Tensor:
        self.step.cache.width = self.width
        out = self.step._forward(*self.inputs)
        if self.logits is None:
            self.logits = out.clone()
        else:
            self.logits.copy_(out)
        return self.logits
