"""core/packing.py's varlen path, on the CPU: torch's varlen flash attention runs on CUDA only, so a reference
implementation with the signature of each torch release stands in for it. What is tested is the project's side:
the per-row segment offsets of k packed rows, grouped-query heads, the causal and scale keywords per torch
version; the result must equal the grid path (transformers' sdpa per example), which tests/core/test_train.py
proves equal to the padded batch. The kernel itself is checked on the GPU (benchmarks/train_bench.py
--packing-check)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from zlt_dagster.core import packing
from zlt_dagster.core.masking import IGNORE


def reference_varlen(names):
    """A varlen_attn stand-in taking only the keywords `names` (one torch release's signature)."""
    def fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        assert set(kw) <= names, f"keyword {set(kw) - names} not in this release's signature"
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
        window = kw.get("window_size")
        causal = kw.get("is_causal", False) or (window is not None and window[1] == 0)
        assert causal
        left = window[0] if window is not None and window[0] >= 0 else None  # keys this far back, at most
        if k.shape[1] != q.shape[1]:
            assert kw.get("enable_gqa"), "fewer kv heads without enable_gqa"
        out = torch.empty_like(q)
        bounds = cu_q.tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            assert e - s <= max_q
            qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))                 # [h, n, d]
            pos = torch.arange(e - s)
            mask = (pos[:, None] >= pos[None, :]) & (left is None or (pos[:, None] - pos[None, :] <= left))
            out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=kw.get("scale"),
                                                      enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1)
        return out
    return fn


RELEASES = {  # torch 2.10, 2.11, 2.12+ (docs.pytorch.org/docs/<version>/nn.attention.varlen.html)
    "2.10": frozenset({"is_causal", "return_aux"}),
    "2.11": frozenset({"return_aux", "scale", "window_size"}),
    "2.12": frozenset({"return_aux", "scale", "window_size", "enable_gqa", "seqused_k", "block_table", "num_splits"}),
}


@pytest.mark.parametrize("release", sorted(RELEASES))
@pytest.mark.parametrize("k", [1, 3])
def test_varlen_path_equals_grid_path(monkeypatch, release, k):
    names = RELEASES[release]
    monkeypatch.setattr(packing, "_varlen_api", lambda: (reference_varlen(names), names))
    g = torch.Generator().manual_seed(0)
    exs = [SimpleNamespace(input_ids=list(range(n)), labels=[IGNORE] * n) for n in (5, 9, 3, 6)]
    batch = packing.collate_packed(exs, 0, "cpu", multiple=8)      # 23 tokens + 1 of alignment padding
    pack = packing.model_kwargs(batch, k)["zlt_pack"]
    assert pack[2].tolist()[-1] == k * batch.tokens and len(pack[2]) == k * (len(exs) + 1) + 1
    heads, kv_heads, d, t = 4, 2, 8, batch.tokens
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    q = torch.randn(k, t, heads, d, generator=g, dtype=torch.float64).transpose(1, 2)   # as transformers gives them
    key = torch.randn(k, t, kv_heads, d, generator=g, dtype=torch.float64).transpose(1, 2)
    value = torch.randn(k, t, kv_heads, d, generator=g, dtype=torch.float64).transpose(1, 2)
    scale = 0.3 if "scale" in names else d ** -0.5
    grid = packing.grid_forward(module, q, key, value, pack, scaling=scale)
    var = packing.varlen_forward(q, key, value, pack, scale)
    assert var.shape == grid.shape == (k, t, heads, d)
    torch.testing.assert_close(var, grid, rtol=1e-12, atol=1e-12)


def test_varlen_refuses_a_scale_it_cannot_take(monkeypatch):
    names = RELEASES["2.10"]
    monkeypatch.setattr(packing, "_varlen_api", lambda: (reference_varlen(names), names))
    batch = packing.collate_packed([SimpleNamespace(input_ids=[1, 2, 3], labels=[IGNORE] * 3)], 0, "cpu")
    q = torch.randn(1, 2, 3, 8).transpose(1, 2).transpose(1, 2)
    with pytest.raises(RuntimeError, match="scale"):
        packing.varlen_forward(q, q, q, packing.model_kwargs(batch, 1)["zlt_pack"], 0.3)


def test_varlen_is_for_eager_cuda_half_precision_only():
    cpu = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)
    assert not packing.use_varlen(cpu)  # CPU: the grid path


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_sliding_window_varlen_equals_grid(monkeypatch, release):
    """A sliding-window layer's window (transformers passes sliding_window=W: a query sees its last W keys) on both
    paths: varlen as window_size=(W - 1, 0) where the release takes it, else the grid with a band mask; both equal
    the plain per-example reference, and a window shorter than no example changes nothing."""
    names = RELEASES[release]
    monkeypatch.setattr(packing, "_varlen_api", lambda: (reference_varlen(names), names))
    g = torch.Generator().manual_seed(1)
    exs = [SimpleNamespace(input_ids=list(range(n)), labels=[IGNORE] * n) for n in (5, 9, 3, 6)]
    batch = packing.collate_packed(exs, 0, "cpu", multiple=8)
    pack = packing.model_kwargs(batch, 2)["zlt_pack"]
    heads, kv_heads, d, t = 4, 2, 8, batch.tokens
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    q = torch.randn(2, t, heads, d, generator=g, dtype=torch.float64).transpose(1, 2)
    key = torch.randn(2, t, kv_heads, d, generator=g, dtype=torch.float64).transpose(1, 2)
    value = torch.randn(2, t, kv_heads, d, generator=g, dtype=torch.float64).transpose(1, 2)
    windowed = reference_varlen(RELEASES["2.12"])(
        q.transpose(1, 2).reshape(-1, heads, d), key.transpose(1, 2).reshape(-1, kv_heads, d),
        value.transpose(1, 2).reshape(-1, kv_heads, d), pack[2], pack[2], 16, 16, window_size=(2, 0),
        enable_gqa=True).view(2, t, heads, d)
    grid = packing.grid_forward(module, q, key, value, pack, window=3)
    torch.testing.assert_close(grid, windowed, rtol=1e-12, atol=1e-12)
    full = packing.grid_forward(module, q, key, value, pack)
    assert not torch.allclose(grid, full)  # the window really bites
    if "window_size" in names:
        torch.testing.assert_close(packing.varlen_forward(q, key, value, pack, None, window=3), windowed,
                                   rtol=1e-12, atol=1e-12)
    else:
        with pytest.raises(RuntimeError, match="window"):
            packing.varlen_forward(q, key, value, pack, None, window=3)
    # through the attention function (CPU: the grid path), the window as transformers passes it
    out, _ = packing.packed_sdpa_forward(module, q, key, value, None, zlt_pack=pack, sliding_window=3)
    torch.testing.assert_close(out, windowed, rtol=1e-12, atol=1e-12)
    wide, _ = packing.packed_sdpa_forward(module, q, key, value, None, zlt_pack=pack, sliding_window=9)
    torch.testing.assert_close(wide, full, rtol=1e-12, atol=1e-12)  # no example is longer than 9: plain causal


def test_varlen_keeps_a_window_only_where_the_release_takes_it(monkeypatch):
    cuda = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda", 0))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(packing, "_flash_capable", lambda index: True)
    for release, takes in (("2.10", False), ("2.11", True)):
        names = RELEASES[release]
        monkeypatch.setattr(packing, "_varlen_api", lambda names=names: (reference_varlen(names), names))
        assert packing.use_varlen(cuda) and packing.use_varlen(cuda, 0.0, 4) == takes


def test_varlen_needs_an_ampere_or_newer_gpu(monkeypatch):
    """torch's varlen_attn calls the flash kernels, which refuse GPUs older than sm80 (V100, T4): those take the
    grid path (transformers' sdpa picks a kernel they have), as the padded batch did."""
    names = RELEASES["2.12"]
    monkeypatch.setattr(packing, "_varlen_api", lambda: (reference_varlen(names), names))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    capability = {0: (7, 5), 1: (8, 0), 2: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability[index])
    packing._flash_capable.cache_clear()
    try:
        on = {i: packing.use_varlen(SimpleNamespace(is_cuda=True, dtype=torch.bfloat16,
                                                    device=torch.device("cuda", i))) for i in capability}
    finally:
        packing._flash_capable.cache_clear()
    assert on == {0: False, 1: True, 2: True}


def test_a_model_without_sdpa_support_is_refused_clearly():
    """Gemma2 (attention logit soft-capping) has no SDPA support, and transformers checks that for any attention
    name containing "sdpa": a RuntimeError naming packed attention, the model's attention untouched."""
    import transformers

    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8))
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="Gemma2ForCausalLM cannot train with packed attention"):
        with packing.packed_attention(model):
            pass
    assert model.config._attn_implementation == before and not hasattr(model, "_zlt_unpacked_attention")
