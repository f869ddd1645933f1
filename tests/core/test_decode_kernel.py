"""Our Triton decode-attention kernel (core/generation/decode_kernel.py) computes what attention over each row's
filled cache slots computes, run by Triton's interpreter on the CPU (tests/core/attention_paths.py); and the static
decode picks it, flash or SDPA in that order, saying why (core/generation/static_attention.attention_choice). Its
speed is a GPU benchmark (benchmarks/decode_attention_bench.py), never a test."""
from __future__ import annotations

import pytest
import torch

from zlt_dagster.core.generation import static_attention

from tests.core.attention_paths import interpreted_decode_kernel


def reference(q, k, v, lengths, scale):
    """float64 attention of row r's query heads over its first lengths[r] slots, query head h on KV head
    h // (heads / kv_heads); q [rows, heads, 1, d], k/v [rows, capacity, kv_heads, d] -> [rows, 1, heads, d]."""
    rows, heads, _, d = q.shape
    g = heads // k.shape[2]
    out = torch.empty(rows, 1, heads, d, dtype=torch.float64)
    for r in range(rows):
        n = int(lengths[r])
        keys = k[r, :n].double().repeat_interleave(g, dim=1)      # [n, heads, d]
        vals = v[r, :n].double().repeat_interleave(g, dim=1)
        w = torch.einsum("hd,nhd->hn", q[r, :, 0].double(), keys) * scale
        out[r, 0] = torch.einsum("hn,nhd->hd", w.softmax(-1), vals)
    return out


def case(heads, kv_heads, d, lengths, capacity, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    # the query as rotary leaves it: a [rows, heads, 1, d] view of [rows, 1, heads, d] memory (strided heads)
    q = torch.randn(rows, 1, heads, d, generator=g).transpose(1, 2)
    k = torch.randn(rows, capacity, kv_heads, d, generator=g)
    v = torch.randn(rows, capacity, kv_heads, d, generator=g)
    return q, k, v, torch.tensor(lengths, dtype=torch.int32)


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (7, 1, 16), (4, 4, 8), (6, 2, 12), (28, 4, 16)])
def test_kernel_equals_attention_over_each_rows_filled_slots(heads, kv_heads, d, monkeypatch):
    """SmolLM2's layout (9 over 3, d 64), one KV head (7 over 1), MHA, a head dim that is not a power of two (12:
    padded to 16 inside), Qwen2.5-7B's grouping (28 over 4: 7 query heads, more than one tile row per KV head is
    not needed, 7 < 16); lengths 1, a block's last slot, the next block's first, and the whole capacity."""
    kernel = interpreted_decode_kernel(monkeypatch)
    q, k, v, lengths = case(heads, kv_heads, d, [1, 64, 65, 130, 7], capacity=130)
    out = kernel.gqa_decode_attention(q, k, v, lengths, 0.125)
    assert out.shape == (5, 1, heads, d) and out.dtype == q.dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), reference(q, k, v, lengths, 0.125), rtol=1e-5, atol=1e-5)


def test_slots_past_a_rows_length_are_never_read(monkeypatch):
    """NaN in every slot past each row's length (what a cache holds there is stale or never written) changes
    nothing: the kernel's loads are masked, not multiplied by zero."""
    kernel = interpreted_decode_kernel(monkeypatch)
    q, k, v, lengths = case(9, 3, 16, [3, 70, 1], capacity=96)
    clean = kernel.gqa_decode_attention(q, k, v, lengths, 0.25)
    past = torch.arange(96)[None, :] >= lengths[:, None].long()
    k[past], v[past] = float("nan"), float("nan")
    dirty = kernel.gqa_decode_attention(q, k, v, lengths, 0.25)
    assert not dirty.isnan().any()
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


def test_kernel_refuses_what_it_does_not_compute(monkeypatch):
    kernel = interpreted_decode_kernel(monkeypatch)
    q, k, v, lengths = case(6, 2, 8, [3, 4], capacity=8)
    with pytest.raises(ValueError, match="2 positions per row"):
        kernel.gqa_decode_attention(torch.zeros(2, 6, 2, 8), k, v, lengths, 1.0)
    with pytest.raises(ValueError, match="not a multiple of 4 KV heads"):
        kernel.gqa_decode_attention(q, torch.zeros(2, 8, 4, 8), torch.zeros(2, 8, 4, 8), lengths, 1.0)
    with pytest.raises(ValueError, match="contiguous head dimension"):
        kernel.gqa_decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, lengths, 1.0)
    with pytest.raises(ValueError, match="lengths \\(2,\\) torch.int64: expected int32"):
        kernel.gqa_decode_attention(q, k, v, lengths.long(), 1.0)
    with pytest.raises(ValueError, match="key \\(2, 8, 2, 8\\) / value \\(2, 7, 2, 8\\)"):
        kernel.gqa_decode_attention(q, k, v[:, :7], lengths, 1.0)


def test_the_probe_passes_the_kernel_and_records_why_a_kernel_failed(monkeypatch):
    """The start-up probe (3 rows, lengths 1/17/77 of 80 slots: two K/V blocks) accepts the interpreted kernel; a
    kernel that raises is a recorded reason, and the decode takes the next path."""
    interpreted_decode_kernel(monkeypatch)
    assert static_attention._probe("triton", torch.device("cpu"), torch.float32, 9, 3, 16) == (True, "")

    def broken(*args):
        raise RuntimeError("PassManager::run failed\nmore detail")

    monkeypatch.setattr(static_attention, "triton_decode", broken)
    assert static_attention._probe("triton", torch.device("cpu"), torch.float32, 9, 3, 16) == (
        False, "triton probe failed: RuntimeError: PassManager::run failed ... more detail")
    monkeypatch.setattr(static_attention, "triton_decode", lambda q, k, v, lengths, scale: q.transpose(1, 2) * 3)
    ok, why = static_attention._probe("triton", torch.device("cpu"), torch.float32, 9, 3, 16)
    assert not ok and why.startswith("triton probe differs from SDPA by ")


def test_attention_choice_takes_triton_then_flash_then_sdpa_and_says_why(monkeypatch):
    cpu = (torch.device("cpu"), torch.bfloat16, 9, 3, 64)
    assert static_attention.attention_choice(*cpu) == ("sdpa", "cpu torch.bfloat16")
    monkeypatch.setattr(static_attention, "flash_decode_check", lambda *a: (True, ""))
    assert static_attention.attention_choice(*cpu) == ("flash", "cpu torch.bfloat16")
    monkeypatch.setattr(static_attention, "triton_decode_check", lambda *a: (True, ""))
    assert static_attention.attention_choice(*cpu) == ("triton", "")
    monkeypatch.setattr(static_attention, "triton_decode_check", lambda *a: (False, "triton is not installed"))
    monkeypatch.setattr(static_attention, "flash_decode_check", lambda *a: (False, "compute capability < 8.0"))
    assert static_attention.attention_choice(*cpu) == ("sdpa", "triton is not installed; compute capability < 8.0")


@pytest.mark.parametrize("value,triton_off,flash_off", [("flash", True, False), ("triton", False, True),
                                                        ("sdpa", True, True), ("auto", False, False)])
def test_the_setting_switches_each_kernel_off(value, triton_off, flash_off, monkeypatch):
    """ZLT_DECODE_ATTENTION: flash / triton keep the other kernel off; sdpa both; auto neither (on a CPU both stay
    off for the device, which is the reason then)."""
    monkeypatch.setenv(static_attention.ATTENTION_ENV, value)
    cpu = (torch.device("cpu"), torch.bfloat16, 9, 3, 64)
    for check, off in ((static_attention.triton_decode_check, triton_off),
                       (static_attention.flash_decode_check, flash_off)):
        ok, why = check(*cpu)
        assert not ok
        assert why == (f"ZLT_DECODE_ATTENTION={value}" if off else "cpu torch.bfloat16")


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (28, 4, 128), (6, 2, 80)])
def test_kernel_in_bf16_equals_attention_to_bf16_rounding(heads, kv_heads, d, monkeypatch):
    """bf16 inputs, as the pipeline decodes: products and softmax in fp32, p rounded to bf16 before p . v (as
    flash-attention does), the output rounded to bf16: within 2e-2 of float64 attention of the same bf16 inputs
    (the start-up probe's tolerance), and not all zero (a dot of raw bf16 bit patterns would be far off)."""
    kernel = interpreted_decode_kernel(monkeypatch)
    q, k, v, lengths = case(heads, kv_heads, d, [1, 64, 65, 130, 7], capacity=130)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = kernel.gqa_decode_attention(q, k, v, lengths, d ** -0.5)
    assert out.dtype == torch.bfloat16 and out.abs().max() > 0.1
    torch.testing.assert_close(out.double(), reference(q, k, v, lengths, d ** -0.5), rtol=0, atol=2e-2)


class LaunchSpy:
    """Stands in for the kernel object: records each launch's grid and keywords, then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.bfloat16, None), (torch.float16, None)])
def test_launch_parameters_the_interpreter_cannot_check(dtype, precision, monkeypatch):
    """What Triton's interpreter ignores but a GPU compile does not: fp32 inputs multiply in full fp32 ("ieee"; the
    NVIDIA default is TF32, ~1e-3 off, H200-measured by the review), 16-bit ones with Triton's default; a head dim
    under 16 is padded to 16 (tl.dot's K >= 16 on NVIDIA); g query heads pad to 16 tile rows, or the next power of
    two above; one program per (row, KV head)."""
    kernel = interpreted_decode_kernel(monkeypatch)
    spy = LaunchSpy(kernel._gqa_decode_kernel)
    monkeypatch.setattr(kernel, "_gqa_decode_kernel", spy)
    for heads, kv_heads, d, block_g, block_d in ((6, 2, 8, 16, 16), (32, 1, 80, 32, 128)):
        q, k, v, lengths = case(heads, kv_heads, d, [5, 9], capacity=12)
        kernel.gqa_decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), lengths, 0.5)
        grid, kw = spy.launches[-1]
        assert grid == (2, kv_heads)
        assert (kw["DOT_PRECISION"], kw["BLOCK_D"], kw["HEAD_DIM"], kw["BLOCK_G"], kw["GROUP"]) == (
            precision, block_d, d, block_g, heads // kv_heads)


def test_the_probe_raises_out_of_memory_and_keeps_a_compile_errors_gist(monkeypatch):
    """Out of memory is not a property of the kernel: it propagates (the decode would not fit either). Triton's
    CompilationError puts the source location first and what went wrong last: the record keeps both ends."""
    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(static_attention, "triton_decode", oom)
    with pytest.raises(torch.OutOfMemoryError):
        static_attention._probe("triton", torch.device("cpu"), torch.float32, 9, 3, 16)

    def compile_error(*args):
        raise RuntimeError("at 27:12:\n    s = tl.dot(q, tl.trans(k))\n            ^\nInput shapes should have M >= 1, "
                           "N >= 1 and K >= 16")

    monkeypatch.setattr(static_attention, "triton_decode", compile_error)
    assert static_attention._probe("triton", torch.device("cpu"), torch.float32, 9, 3, 16) == (
        False, "triton probe failed: RuntimeError: at 27:12: ... Input shapes should have M >= 1, N >= 1 and K >= 16")
