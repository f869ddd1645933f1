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
  * attention for one new token per row that reads each KV head once and only the slots a row has filled
    (static_attention.py: our Triton kernel, torch's flash varlen kernel or SDPA, whichever runs here);
  * `DecodeStep`: on CUDA the model's forward for one token per row is captured as a CUDA graph per row count (and
    width bucket on the SDPA path) and replayed: one launch a step instead of thousands. Rows leaving the batch
    (sampling.py's compaction) move to the front of the same buffers; the next step captures a graph for the
    smaller batch.
Models with sliding-window layers, attention soft-capping, latent (MLA) caches or dynamic RoPE keep the
DynamicCache loop (`unsupported_reason`).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from ..models import text_config, unwrap_peft
from . import static_attention
from .cache_keyword import cache_kwargs

# SDPA path: columns of the cache a step reads, rounded up to a multiple of this (one graph capture per 128 steps;
# on average half a bucket of masked columns read per step: 64 x 23 KB a row on SmolLM2, ~3% of a 512-token
# answer's cache). The Triton and flash paths read exactly the filled columns and need no buckets.
WIDTH_BUCKET = 128


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


@functools.cache
def _cache_classes():
    """StaticDecodeCache and its layer, built once on first use: transformers is imported lazily, as elsewhere in
    core. Once: torch.compile guards on a cache's type, so a class built per decode would recompile every layer."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class StaticDecodeLayer(CacheLayerMixin):
        """One layer's K and V: [rows, capacity, kv_heads, d] buffers, rows left-aligned, written at the cache's
        per-row column; attention gets the whole buffers (and the step's lengths through
        static_attention.DecodeBatch)."""
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
    inside `static_attention.decode_attention`.

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
        heads, kv_heads, head_dim = static_attention.head_layout(model)
        if (kv_heads, head_dim) != tuple(layer.keys.shape[2:]):
            raise RuntimeError(f"the cache holds {tuple(layer.keys.shape[2:])} (KV heads, head dim); the model's "
                               f"attention says {(kv_heads, head_dim)}")
        self.path = static_attention.attention_choice(device, layer.keys.dtype, heads, kv_heads, head_dim)[0]
        self.graph = None          # the graph of the current shape: _CudaGraph, or _EmulatedGraph off CUDA
        self.next_width = int(cache.column.max())  # host bound on the longest row: it counts the steps, no reads

    @property
    def rows(self) -> int:
        return self.token.shape[0]

    def _forward(self, token: torch.Tensor, position: torch.Tensor, width: int) -> torch.Tensor:
        c = self.cache
        batch = static_attention.batch_for(self.path, (c.column + 1).to(torch.int32), c.capacity, width)
        with static_attention.step_batch(batch):
            out = self.model(input_ids=token, position_ids=position, **self.kv, use_cache=True, logits_to_keep=1)
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
