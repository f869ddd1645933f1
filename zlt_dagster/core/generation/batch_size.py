"""Rows per generation (or ARC) batch, sized to the device (issue 17, item 1).

The protocol's `data.gen_batch_size`, `eval.gen_batch_size` and `eval.arc_batch_size` are overrides: a positive
value is used as it is; 0 = sized at run time. On a GPU that means as many rows as free memory holds, all of them
at once where it fits (a small model's decode step is host-bound, ~1,000 kernel launches whatever the rows). On a
CPU it means the fixed CPU_ROWS of the field: a CPU is compute-bound, so a larger batch buys nothing, and a fixed
size keeps CPU results the same as before the fields became overrides (a batch draws its own seed, so the batch
size changes which tokens are sampled, never their distribution).

The arithmetic, per row (one sequence being generated; one ARC continuation):

    kv/token    = 2 (K and V) x layers x kv_heads x head_dim x dtype bytes
                  (SmolLM2-135M bf16: 2 x 30 x 3 x 64 x 2 = 23,040 B; Qwen2.5-7B: 2 x 28 x 4 x 128 x 2 = 57,344 B)
    act/token   = (4 x hidden + 3 x intermediate) x dtype bytes: one layer's transient activations in a forward
                  without grad (residual, q/k/v/o, MLP gate/up/product), for the prompt's prefill
    generation  = KV_HEADROOM x kv/token x (prompt + max_new_tokens)      the row's KV cache at its longest
                  (STATIC_KV_HEADROOM for the static decode)
                + act/token x prompt                                        its prefill
                + LOGITS_COPIES x vocab x 4                                 fp32 logits and the sampler's copies
    ARC         = KV_HEADROOM x kv/token x sequence + act/token x sequence + ARC_LOGITS_COPIES x vocab x 4 x
                  continuation tokens
    budget      = free device memory now - RESERVE_FRACTION x total device memory
    rows        = min(rows wanted, budget // row bytes), at least 1

E.g. SmolLM2-135M in bf16, 2,200 completions of <= 512 tokens after ~70-token prompts: 23,040 x 1.25 x 582
+ 13,824 x 70 + 8 x 49,152 x 4 = 19.3 MB per row, 39.5 GiB for all 2,200: all at once on an H200 (~139 GiB).
Qwen2.5-7B: 57,344 x 1.25 x 582 + 142,336 x 70 + 8 x 152,064 x 4 = 56.5 MB per row, 116 GiB for 2,200: with
~124 GiB free beside its 15 GB of weights on an H200 the budget (110 GiB) holds ~2,090 rows (two batches); on an
80 GB card (~65 GiB free) ~1,080. With the static decode (STATIC_KV_HEADROOM 1.05 in place of 1.25): 57,344 x
1.05 x 582 + ... = 49.9 MB per row, 102 GiB for 2,200: all at once on an H200.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..models import text_config, unwrap_peft

# The values 0 stands for on a CPU: what the fields held before they became overrides (data 32, eval 64, ARC 32).
CPU_ROWS = {"data.gen_batch_size": 32, "eval.gen_batch_size": 64, "eval.arc_batch_size": 32}
CPU_ROWS_DEFAULT = 32            # a backend asked for 0 rows on a CPU by a caller that named no field
RESERVE_FRACTION = 0.10          # of total device memory: cuBLAS/attention workspaces, allocator slack, other users
# DynamicCache grows by torch.cat, layer by layer, and dropping finished rows copies the cache: a layer's old and
# new K/V coexist for a moment, and the caching allocator cannot reuse the smaller freed blocks for the larger
# ones at once. A quarter on top of the cache's own size (an estimate; the GPU benchmark measures the peak).
KV_HEADROOM = 1.25
# The static decode (generation/static_decode.py) allocates the cache once at its full width, moves the prompt's
# cache in one layer at a time (that layer's prompt copy and buffer coexist) and drops rows in place, one layer's
# kept rows at a time: 1/layers of the cache on top (3% on SmolLM2's 30 layers, 4% on Qwen2.5-7B's 28); the CUDA
# graph pool holds one step's activations, counted in the per-row prefill activations.
STATIC_KV_HEADROOM = 1.05
# fp32 logits of the last position (1), temperature-scaled (1), softmax for multinomial (1); top-p adds the
# sort's values (1) and int64 indices (2), their cumsum (1) and the masked copy (1): 8 vocab-sized fp32 buffers
LOGITS_COPIES = 8
# ARC: logits of each continuation token in the model dtype, in fp32 and their log-softmax: at most 3 fp32 copies
ARC_LOGITS_COPIES = 3


@dataclass(frozen=True)
class BatchSize:
    """rows: sequences (or ARC continuations) per batch; source: how they were chosen, for stats.json:
    "protocol" (an explicit protocol value), "cpu default" (0 on a CPU) or "auto: N rows from X GiB free ..."."""
    rows: int
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelShape:
    """What the per-row bytes depend on, from the model's config; dtype_bytes from its weights."""
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int

    @classmethod
    def of(cls, model) -> "ModelShape":
        """The shape of a transformers causal LM (a peft wrapper is looked through). Raises ValueError naming the
        config field it lacks."""
        base = unwrap_peft(model)
        cfg = text_config(base)

        def need(name: str) -> int:
            value = getattr(cfg, name, None)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model config field {name}={value!r}: cannot size the batch to the device; "
                                 "set the protocol's batch size explicitly")
            return value

        heads = need("num_attention_heads")
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or need("hidden_size") // heads
        dtype = next(base.parameters()).dtype
        return cls(layers=need("num_hidden_layers"), kv_heads=kv_heads, head_dim=head_dim, hidden=need("hidden_size"),
                   intermediate=need("intermediate_size"), vocab=need("vocab_size"),
                   dtype_bytes=torch.empty((), dtype=dtype).element_size())

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def activation_bytes_per_token(self) -> int:
        return (4 * self.hidden + 3 * self.intermediate) * self.dtype_bytes


def generation_row_bytes(shape: ModelShape, prompt_tokens: int, max_new_tokens: int,
                         kv_headroom: float = KV_HEADROOM) -> int:
    """Bytes one generated row may hold at its peak (module docstring): KV cache at prompt + max_new_tokens with
    headroom (KV_HEADROOM for DynamicCache, STATIC_KV_HEADROOM for the static decode), its prompt's prefill
    activations, the sampler's vocab-sized fp32 buffers."""
    return int(kv_headroom * shape.kv_bytes_per_token * (prompt_tokens + max_new_tokens)
               + shape.activation_bytes_per_token * prompt_tokens + LOGITS_COPIES * shape.vocab * 4)


def arc_row_bytes(shape: ModelShape, sequence_tokens: int, continuation_tokens: int) -> int:
    """Bytes one ARC continuation may hold (module docstring): its context's KV cache copy and activations over
    the whole sequence, and fp32 logits + log-softmax at its continuation tokens."""
    return int(KV_HEADROOM * shape.kv_bytes_per_token * sequence_tokens
               + shape.activation_bytes_per_token * sequence_tokens
               + ARC_LOGITS_COPIES * shape.vocab * 4 * continuation_tokens)


def rows_that_fit(free_bytes: int, total_bytes: int, row_bytes: int, rows_wanted: int) -> int:
    """min(rows_wanted, (free - RESERVE_FRACTION x total) // row_bytes), at least 1 (one row that does not fit
    fails with the device's own out-of-memory error, which names the sizes).

    >>> rows_that_fit(100 * 2**30, 140 * 2**30, 20 * 2**20, 2200)   # 86 GiB budget / 20 MiB = 4,403 rows
    2200
    >>> rows_that_fit(30 * 2**30, 80 * 2**30, 20 * 2**20, 2200)     # 22 GiB / 20 MiB
    1126
    """
    if row_bytes < 1 or rows_wanted < 1:
        raise ValueError(f"row_bytes={row_bytes}, rows_wanted={rows_wanted}; expected both >= 1")
    budget = free_bytes - RESERVE_FRACTION * total_bytes
    return max(1, min(rows_wanted, int(budget // row_bytes)))


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device now. Free counts what torch's caching allocator holds but does not use:
    it is ours to reuse, and the driver reports it as taken (measured on the H200: after a 2,200-row decode whose
    peak was 23 GiB, the driver's free figure was 6.5 GiB of 139 and ARC was sized to ONE row)."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached), int(total)


def check_rows(field: str, value) -> int:
    """`value` if it is an integer >= 0 (0 = sized at run time); else ValueError naming `field`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{field}={value!r}; expected 0 (sized at run time) or a positive integer")
    return value


def requested(field: str, value: int, device: torch.device) -> BatchSize:
    """What a step asks a backend for, from a protocol field (`field`, e.g. "eval.gen_batch_size"): a positive
    value as it is ("protocol"); 0 on a CUDA device stays 0 ("auto": the backend sizes the batch at the call, from
    that call's prompts and token limit, `for_generation` / `for_arc`); 0 elsewhere = CPU_ROWS[field]."""
    if check_rows(field, value):
        return BatchSize(value, "protocol")
    if device.type == "cuda":
        return BatchSize(0, "auto")
    return BatchSize(CPU_ROWS[field], f"cpu default ({field} 0 = sized at run time)")


def _sized(row_bytes: int, rows_wanted: int, device: torch.device, memory: tuple[int, int] | None) -> BatchSize:
    if device.type != "cuda" and memory is None:
        return BatchSize(max(1, min(rows_wanted, CPU_ROWS_DEFAULT)), "cpu default")
    free, total = memory if memory is not None else device_memory(device)
    rows = rows_that_fit(free, total, row_bytes, rows_wanted)
    return BatchSize(rows, f"auto: {rows:,} of {rows_wanted:,} rows from {free / 2**30:.1f} GiB free "
                           f"({row_bytes / 2**20:.1f} MiB per row)")


def for_generation(model, device: torch.device, prompt_tokens: int, max_new_tokens: int, rows_wanted: int,
                   memory: tuple[int, int] | None = None, kv_headroom: float = KV_HEADROOM) -> BatchSize:
    """Rows per generation batch for a backend asked for 0: as many of `rows_wanted` as `generation_row_bytes`
    lets fit in the device's free memory (CUDA), or CPU_ROWS_DEFAULT on a CPU. prompt_tokens: the longest prompt.
    memory: (free, total) bytes instead of asking the device (tests, and what-if arithmetic). kv_headroom: see
    generation_row_bytes."""
    row = generation_row_bytes(ModelShape.of(model), prompt_tokens, max_new_tokens, kv_headroom)
    return _sized(row, rows_wanted, device, memory)


def for_arc(model, device: torch.device, sequence_tokens: int, continuation_tokens: int, rows_wanted: int,
            memory: tuple[int, int] | None = None) -> BatchSize:
    """ARC continuations per forward for a scorer asked for 0 (see `for_generation`): sequence_tokens and
    continuation_tokens of the longest pair."""
    row = arc_row_bytes(ModelShape.of(model), sequence_tokens, continuation_tokens)
    return _sized(row, rows_wanted, device, memory)
