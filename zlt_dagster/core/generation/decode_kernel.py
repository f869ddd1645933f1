"""A Triton kernel for the static decode's attention (issue 17): one new query token per row, grouped-query
attention over a left-aligned [rows, capacity, kv_heads, d] KV cache, each row reading its first `length` slots.

Why our own kernel, not a library's (BENCHMARKS.md, issue 17, fourth session): torch's flash-attention varlen
kernel, which the decode used, puts each (row, KV head) in a 128-query-row tile of which only the g = heads /
kv_heads query heads of that KV head are real (SmolLM2: 3 of 128), so its time went to the padding: 41% of the
compiled decode step's kernel time (5.1 ms a step at 2,200 rows over the first 64 steps, where the K/V it reads
take ~1 ms at the H200's bandwidth). Measured on the H200 (benchmarks/decode_attention_bench.py, 2,200 rows, one
layer): SmolLM2 shapes 202 -> 50 us at ~96 filled slots a row, 524 -> 212 us at ~512 (4.1 TB/s of K/V read);
Qwen2.5-7B shapes 382 -> 131 and 1,065 -> 547 us; the completions workload 97.7k -> 148.1k tok/s.
flash-attention's own decode entry (`flash_attn_with_kvcache`, 64-row tiles and split KV) is not in torch 2.11, and
the flash-attn / FlashInfer / vLLM packages are not on the GPU machine.
Here a program handles one (row, KV head): its g query heads are the rows of a 16-row tile (MIN_TILE_ROWS), K
and V are read once in BLOCK_N-slot blocks with an online softmax (flash-attention's recurrence, Dao et al. 2022,
in base 2 as Triton's own fused-attention tutorial does), and the query and output are read and written in the
layouts the model gives and wants (no transposes or copies around the call).

Imported only where Triton is (the CUDA path; CPU tests run it under TRITON_INTERPRET=1, which Triton reads when
this module's kernel is decorated): `static_attention` imports it lazily.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# slots per K/V block a program loads at a time (64 slots x 64 dims of bf16 = 8 KiB of K and of V), and the launch
# shape. A sweep of BLOCK_N 32/64/128 x warps 2/4/8 x stages 1/2/3 on the H200 (decode_attention_bench.py --sweep,
# BENCHMARKS.md issue 17 fourth session) put this one within 2.4% of the best from ~192 filled slots a row on
# SmolLM2 and 4% on 7B shapes, 9% / 16% at ~96 slots (4 / 18 us a layer). (32, 2, 3) came within 0.7% everywhere,
# but the pipeline's figures were measured with this one, and the difference is under 0.5 ms of a decode step. A
# fixed shape, not Triton's autotuner: that would benchmark inside the decode's first graph capture
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2
# a KV head's g query heads are padded to this many tile rows (g = 3 on SmolLM2, 7 on Qwen2.5-7B): 16 is the M of the
# tensor cores' bf16 mma instruction (m16n8k16), so a smaller tile would not do less work
MIN_TILE_ROWS = 16
# Triton 3.6 compiles tl.dot for NVIDIA GPUs only with an inner dimension K >= 16: head dims below pad to this
# (q . k^T's K is the head dim; p . v's K is BLOCK_N)
MIN_HEAD_BLOCK = 16


@triton.jit
def _gqa_decode_kernel(Q, K, V, Out, Lengths, qk_scale_log2,
                       stride_qr, stride_qh, stride_kr, stride_kn, stride_kh,
                       stride_vr, stride_vn, stride_vh, stride_or, stride_oh,
                       GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # int64 row offsets: rows x capacity x kv_heads x d passes 2^31 elements on large caches
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    length = tl.load(Lengths + row)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    head = kv_head * GROUP + g          # transformers' repeat_kv order: query head j*g + i uses KV head j
    in_group = g < GROUP
    in_dim = d < HEAD_DIM
    q = tl.load(Q + row * stride_qr + head[:, None] * stride_qh + d[None, :],
                mask=in_group[:, None] & in_dim[None, :], other=0.0)
    k_ptrs = K + row * stride_kr + kv_head * stride_kh + n[:, None] * stride_kn + d[None, :]
    v_ptrs = V + row * stride_vr + kv_head * stride_vh + n[:, None] * stride_vn + d[None, :]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(0, length, BLOCK_N):
        valid = (start + n) < length
        kv_mask = valid[:, None] & in_dim[None, :]
        k = tl.load(k_ptrs + start * stride_kn, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_G, BLOCK_N], log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start * stride_vn, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(Out + row * stride_or + head[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
             mask=in_group[:, None] & in_dim[None, :])


def gqa_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Attention of one new token per row over that row's first lengths[row] cache slots (not causal within them:
    they are all earlier tokens and this one).

    query [rows, heads, 1, d] (any strides with d contiguous: rotary's output is used as it is); key, value [rows,
    capacity, kv_heads, d] with d contiguous (the StaticDecodeCache buffers); lengths int32 [rows], each in [1,
    capacity] (a row of length 0 would divide by zero: the decode always holds at least this step's token); scale:
    the softmax scale (head_dim ** -0.5 for transformers' models). heads a multiple of kv_heads; query head h uses KV
    head h // (heads / kv_heads) (transformers' repeat_kv order). Returns [rows, 1, heads, d] in query's dtype, the
    layout transformers' attention functions return. Products and the softmax in fp32; fp32 inputs multiply in full
    fp32 ("ieee": Triton's default for them on NVIDIA GPUs is TF32, ~1e-3 off, which an fp32 protocol does not ask
    for). ValueError for shapes or strides it does not take."""
    rows, heads, one, d = query.shape
    if one != 1:
        raise ValueError(f"query has {one} positions per row; this kernel takes 1")
    if key.shape != value.shape or key.dim() != 4 or key.shape[0] != rows or key.shape[3] != d:
        raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)}: expected [{rows}, capacity, "
                         f"kv_heads, {d}]")
    kv_heads = key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if query.stride(3) != 1 or key.stride(3) != 1 or value.stride(3) != 1:
        raise ValueError("query, key and value need a contiguous head dimension")
    if lengths.shape != (rows,) or lengths.dtype != torch.int32:
        raise ValueError(f"lengths {tuple(lengths.shape)} {lengths.dtype}: expected int32 [{rows}]")
    group = heads // kv_heads
    out = query.new_empty(rows, 1, heads, d)
    _gqa_decode_kernel[(rows, kv_heads)](
        query, key, value, out, lengths, scale * math.log2(math.e),
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), out.stride(0), out.stride(2),
        GROUP=group, BLOCK_G=max(MIN_TILE_ROWS, triton.next_power_of_2(group)), HEAD_DIM=d,
        BLOCK_D=max(MIN_HEAD_BLOCK, triton.next_power_of_2(d)), BLOCK_N=BLOCK_N,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else None,  # None: Triton's default (16-bit inputs)
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out
