"""The static decode's three attention paths on the CPU (core/generation/static_attention.py): `sdpa` as it runs here;
`flash` with a per-row reference kernel standing in for torch's CUDA-only flash varlen kernel; `triton` with OUR
kernel itself (core/generation/decode_kernel.py) run by Triton's interpreter (TRITON_INTERPRET=1)."""
from __future__ import annotations

import pytest
import torch

from zlt_dagster.core.generation import static_attention

PATHS = ("sdpa", "flash", "triton")


def reference_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqused_k):
    """What static_attention.flash_varlen asks torch's CUDA flash kernel for, written out per row (CPU tests): row r's
    queries q[cu_q[r] : cu_q[r+1]] attend (not causally) to k[cu_k[r] : cu_k[r] + seqused_k[r]], query head h to
    KV head h // (heads / kv_heads)."""
    rows = len(cu_q) - 1
    assert len(cu_k) == rows + 1 and cu_q.dtype == cu_k.dtype == seqused_k.dtype == torch.int32
    assert int(seqused_k.max()) <= max_k and int((cu_q[1:] - cu_q[:-1]).max()) <= max_q and cu_q[-1] == q.shape[0]
    out = torch.empty_like(q)
    heads, kv_heads = q.shape[1], k.shape[1]
    for r in range(rows):
        start, n = int(cu_k[r]), int(seqused_k[r])
        keys = k[start:start + n].repeat_interleave(heads // kv_heads, dim=1)     # [n, heads, d]
        vals = v[start:start + n].repeat_interleave(heads // kv_heads, dim=1)
        qs = q[int(cu_q[r]):int(cu_q[r + 1])].double()                          # [queries, heads, d]
        w = torch.einsum("qhd,nhd->qhn", qs, keys.double()) * scale
        out[int(cu_q[r]):int(cu_q[r + 1])] = torch.einsum("qhn,nhd->qhd", w.softmax(-1), vals.double()).to(q.dtype)
    return out


def mend_triton_interpreter(setattr_) -> None:
    """Two mends to Triton 3.6's interpreter, applied with `setattr_` (monkeypatch.setattr in tests, so they are
    undone after each; plain setattr in the benchmark's CPU dry run):
      * NumPy >= 2.4 refuses int() of a 1-element array; the interpreter holds a loaded scalar (a row's length) as
        one, and the kernel's loop bound calls __index__ on it;
      * its tl.dot multiplies bf16 operands as their raw uint16 bit patterns (it stores bf16 as uint16 and widens
        only fp8): they are read as the numbers they encode first (bf16 is the top half of an fp32)."""
    import numpy as np  # here: only with Triton, which a test may skip without
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    original_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        import triton.language as tl  # here: the interpreter's own dtype objects, as it compares them

        def widened(h):
            if h.dtype.scalar != tl.bfloat16:
                return h
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

        return original_dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    setattr_(interpreter, "_patch_lang_tensor", patch_lang_tensor)
    setattr_(interpreter.InterpreterBuilder, "create_dot", create_dot)


def interpreted_decode_kernel(monkeypatch):
    """decode_kernel with its kernel run by Triton's interpreter on CPU tensors (mend_triton_interpreter applied).
    tests/conftest.py sets TRITON_INTERPRET=1 before anything imports Triton (Triton decides at decoration, its own
    helpers at import); this fails loudly where that did not happen. pytest skips where Triton is not installed (a
    test dependency on Linux x86-64)."""
    pytest.importorskip("triton")
    from triton import knobs
    from triton.runtime import interpreter

    from zlt_dagster.core.generation import decode_kernel

    if not knobs.runtime.interpret or not isinstance(decode_kernel._gqa_decode_kernel, interpreter.InterpretedFunction):
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)")
    mend_triton_interpreter(monkeypatch.setattr)
    return decode_kernel


def use_attention_path(monkeypatch, path: str) -> None:
    """Make every DecodeStep of this test take `path` (one of PATHS); see the module docstring."""
    if path == "flash":
        monkeypatch.setattr(static_attention, "flash_varlen", reference_flash_varlen)
    elif path == "triton":
        interpreted_decode_kernel(monkeypatch)
    elif path != "sdpa":
        raise ValueError(f"path {path!r}; expected one of {PATHS}")
    if path != "sdpa":
        monkeypatch.setattr(static_attention, "attention_choice", lambda *a: (path, ""))
