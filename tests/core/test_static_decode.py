"""The decode step without host overhead (core/generation/static_decode.py, issue 17 item 3) computes what the
model's own attention and transformers' DynamicCache compute (CPU, tiny random models; the decode loop's equality
with generate() on all three paths is in test_fast_paths.py). CUDA graph capture itself runs on the GPU only
(benchmarks/gen_bench.py); off CUDA the same fixed-buffer protocol is replayed by _EmulatedGraph."""
from __future__ import annotations

import warnings

import pytest
import torch

from zlt_dagster.core.generation import static_attention, static_decode
from zlt_dagster.core.generation.sampling import decode_path, sample_new_tokens

from tests.core.attention_paths import PATHS, reference_flash_varlen, use_attention_path
from tests.core.test_fast_paths import EOS, PAD, hf_generate

warnings.filterwarnings("ignore", message=".*past_key_values.*")



def prompts_for(vocab: int, n: int = 12, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def hf_greedy(model, prompts, max_new):
    """generate()'s greedy new tokens, left-padded prompts (test_fast_paths.hf_generate)."""
    return hf_generate(model, prompts, max_new, do_sample=False)


def build(cfg_cls: str, model_cls: str, **extra):
    """A tiny random transformers model (eval mode, seed 0) of the named config and model classes: 6 query heads
    over 2 KV heads, vocabulary 48, EOS 42, PAD 0; `extra` overrides config fields."""
    import transformers

    common = dict(vocab_size=48, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, pad_token_id=PAD,
                  eos_token_id=EOS, bos_token_id=2)
    common.update(extra)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**common)).eval()


def tiny(kind: str, **extra):
    return build(*{"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                   "mistral": ("MistralConfig", "MistralForCausalLM")}[kind], **extra)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (7, 1), (4, 4)])
def test_decode_attention_equals_sdpa_with_repeated_kv(heads, kv_heads, path, monkeypatch):
    """One query per row over its first length slots of a left-aligned [rows, capacity, kv_heads, d] cache: every
    path (SDPA with the grouped-query view; the flash varlen call, here with a per-row reference kernel; our Triton
    kernel, interpreted) gives transformers' sdpa result (K/V repeated per query head, padding masked) to float64
    rounding (the Triton kernel: fp32 rounding, it computes in fp32), in its output layout [rows, 1, heads, d]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    use_attention_path(monkeypatch, path)
    rows, capacity, width, d = 5, 13, 11, 8
    dtype = torch.float32 if path == "triton" else torch.float64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, heads, 1, d, generator=g, dtype=torch.float64)
    k = torch.randn(rows, capacity, kv_heads, d, generator=g, dtype=torch.float64)
    v = torch.randn(rows, capacity, kv_heads, d, generator=g, dtype=torch.float64)
    lengths = torch.tensor([11, 8, 10, 4, 1])
    mask = (torch.arange(width)[None, :] < lengths[:, None])[:, None, None, :]
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = heads // kv_heads, True, False
    ref, _ = sdpa_attention_forward(module, q, k[:, :width].transpose(1, 2), v[:, :width].transpose(1, 2), mask,
                                    scaling=0.3)
    batch = static_attention.batch_for(path, lengths.to(torch.int32), capacity, width)
    out, _ = static_attention.decode_attention_forward(module, q.to(dtype), k.to(dtype), v.to(dtype), None,
                                                       scaling=0.3, zlt_decode=batch)
    assert out.shape == (rows, 1, heads, d) and out.dtype == dtype
    tol = 1e-5 if path == "triton" else 1e-12
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_decode_attention_refuses_what_it_does_not_compute():
    module = torch.nn.Module()
    q, k = torch.zeros(2, 4, 1, 8), torch.zeros(2, 5, 2, 8)
    batch = static_attention.batch_for("sdpa", torch.tensor([5, 3], dtype=torch.int32), 5, 5)
    with pytest.raises(RuntimeError, match="one query position"):
        static_attention.decode_attention_forward(module, torch.zeros(2, 4, 3, 8), k, k, None, zlt_decode=batch)
    with pytest.raises(RuntimeError, match="DecodeBatch"):
        static_attention.decode_attention_forward(module, q, k, k, None)
    with pytest.raises(RuntimeError, match="sliding window"):
        static_attention.decode_attention_forward(module, q, k, k, None, sliding_window=4, zlt_decode=batch)


def test_flash_path_off_cuda_and_switched_off(monkeypatch):
    assert not static_attention.flash_decode_check(torch.device("cpu"), torch.bfloat16, 9, 3, 64)[0]
    monkeypatch.setenv(static_attention.ATTENTION_ENV, "sdpa")
    assert not static_attention.flash_decode_check(torch.device("cpu"), torch.bfloat16, 9, 3, 64)[0]
    monkeypatch.setenv(static_attention.ATTENTION_ENV, "fast")
    with pytest.raises(ValueError, match="ZLT_DECODE_ATTENTION: 'fast'; expected auto, triton, flash or sdpa"):
        static_attention.flash_decode_check(torch.device("cpu"), torch.bfloat16, 9, 3, 64)[0]
    with pytest.raises(ValueError, match="ZLT_DECODE_ATTENTION: 'fast'"):  # also where the CPU would not read it
        decode_path(tiny("llama"))


@pytest.mark.parametrize("kind,graphs,path", [(k, g, p) for k in ("qwen2", "llama") for g, p in (
    (False, "sdpa"), (True, "sdpa"), (True, "flash"))] + [("llama", True, "triton")])  # interpreted: seconds a case
def test_static_greedy_equals_generate_on_gqa_models(kind, graphs, path, monkeypatch):
    """3 query heads per KV head, rows dropped as they end, 5-slot buckets (SDPA path with graphs), the flash path
    through the reference kernel, our Triton kernel interpreted: generate()'s tokens."""
    monkeypatch.setattr(static_decode, "WIDTH_BUCKET", 5)
    use_attention_path(monkeypatch, path)
    model = tiny(kind)
    prompts = prompts_for(48)
    ref = hf_greedy(model, prompts, 30)
    new = sample_new_tokens(model, prompts, 30, EOS, PAD, temperature=0, check_every=2, compact_fraction=0.01,
                            decode="static", graphs=graphs)
    assert torch.equal(new, ref[:, :new.shape[1]])


def test_static_decode_with_an_attached_peft_adapter(monkeypatch, tmp_path):
    """The pipeline's bf16 path keeps adapters attached (peft LoRA layers, unmerged): the static decode runs
    through them and samples what the dynamic one samples (same seed, no row dropping)."""
    from peft import LoraConfig

    from zlt_dagster.core.generation.transformers_backend import attached_adapter
    from zlt_dagster.core.random_adapter import save_random_adapter

    monkeypatch.setattr(static_decode, "WIDTH_BUCKET", 4)
    model = tiny("llama")
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", bias="none",
                     task_type="CAUSAL_LM")
    save_random_adapter(model, cfg, tmp_path / "a", b_std=0.3, seed=3)
    prompts = prompts_for(48, 6)
    with attached_adapter(model, str(tmp_path / "a")) as peft_model:
        out = {}
        for name, kw in {"dynamic": {"decode": "dynamic"}, "graphs": {"decode": "static", "graphs": True}}.items():
            torch.manual_seed(5)
            out[name] = sample_new_tokens(peft_model, prompts, 20, EOS, PAD, temperature=1.0, compact_fraction=2.0,
                                          repeats=3, **kw)
    assert torch.equal(out["graphs"], out["dynamic"])
    assert model.config._attn_implementation == "sdpa"  # restored after the static decode


def test_models_the_static_decode_cannot_run_keep_the_dynamic_loop():
    """Sliding-window layers (Mistral) and soft-capping: auto falls back and says why; asking for static fails
    with the reason. Qwen2 without use_sliding_window is plain full attention."""
    mistral = tiny("mistral", sliding_window=4)
    assert static_decode.unsupported_reason(mistral)
    assert decode_path(mistral).startswith("dynamic (")
    with pytest.raises(ValueError, match="not possible for this model"):
        sample_new_tokens(mistral, prompts_for(48, 2), 4, EOS, PAD, decode="static")
    prompts = prompts_for(48, 4)
    assert torch.equal(sample_new_tokens(mistral, prompts, 12, EOS, PAD, temperature=0),
                       hf_greedy(mistral, prompts, 12)[:, :12])
    assert static_decode.unsupported_reason(tiny("qwen2", use_sliding_window=False, sliding_window=4)) is None
    llama = tiny("llama")
    llama.config.final_logit_softcapping = 30.0
    assert "softcapping" in static_decode.unsupported_reason(llama)


def test_decode_path_names_what_runs():
    model = tiny("llama")
    assert decode_path(model) == "dynamic (CPU)"
    assert decode_path(model, "static", graphs=False) == "static, sdpa (cpu torch.float32) attention"
    assert decode_path(model, "static", graphs=True) == "static, CUDA graphs, sdpa (cpu torch.float32) attention"
    assert decode_path(model, "dynamic") == "dynamic"
    with pytest.raises(ValueError, match="decode='fast'"):
        decode_path(model, "fast")


def test_decode_attention_is_restored_after_an_error():
    model = tiny("llama")
    with pytest.raises(KeyError):
        with static_attention.decode_attention(model):
            assert model.config._attn_implementation == static_attention.DECODE_ATTENTION
            raise KeyError("boom")
    assert model.config._attn_implementation == "sdpa"


def prefilled(rows=4, heads=2, width=3, d=2):
    """A DynamicCache after a left-padded prompt batch: row r has r % width padding slots, then its tokens; K holds
    its own (row, head, column, channel) coordinates, V their negatives."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(2):
        k = torch.arange(rows * heads * width * d, dtype=torch.float32).view(rows, heads, width, d) + 1000 * layer
        cache.update(k, -k, layer)
    mask = (torch.arange(width)[None, :] >= (torch.arange(rows) % width)[:, None]).long()
    return cache, mask


def test_static_cache_left_aligns_rows_writes_at_their_columns_and_keeps_rows_in_place():
    dyn, mask = prefilled()
    k_in = dyn.layers[1].keys.clone()
    cache = static_decode.static_decode_cache(dyn, mask, capacity=6)
    layer = cache.layers[1]
    assert all(la.keys is None and la.values is None for la in dyn.layers)  # moved in, not held twice
    assert torch.equal(cache.column, torch.tensor([3, 2, 1, 3]))  # tokens per row
    for r, n in enumerate([3, 2, 1, 3]):  # row r's tokens, padding removed, in slots 0..n-1, [capacity, heads, d]
        assert torch.equal(layer.keys[r, :n], k_in[r, :, 3 - n:].transpose(0, 1))
    storage = layer.keys.data_ptr()
    new = torch.arange(4 * 2 * 2, dtype=torch.float32).view(4, 2, 1, 2) + 7000
    k, v = cache.update(new, -new, 1)
    assert k is layer.keys and k.shape == (4, 6, 2, 2)
    for r, col in enumerate([3, 2, 1, 3]):
        assert torch.equal(layer.keys[r, col], new[r, :, 0]) and torch.equal(layer.values[r, col], -new[r, :, 0])
    before = layer.keys.clone()
    cache.keep_rows(torch.tensor([1, 3]))
    assert layer.keys.shape == (2, 6, 2, 2) and layer.keys.data_ptr() == storage  # the same buffer, front rows
    assert torch.equal(layer.keys, before[[1, 3]]) and torch.equal(cache.column, torch.tensor([2, 3]))
    assert torch.equal(cache.row_index, torch.arange(2))


def test_static_cache_refuses_a_prompt_wider_than_its_capacity():
    dyn, mask = prefilled()
    with pytest.raises(ValueError, match="capacity 2 < prompt width 3"):
        static_decode.static_decode_cache(dyn, mask, capacity=2)


def test_decode_step_stops_at_the_cache_capacity():
    model = tiny("llama")
    prompts = prompts_for(48, 3)
    width = max(map(len, prompts))
    from transformers import DynamicCache

    from zlt_dagster.core.generation.sampling import cache_kwargs

    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache), use_cache=True)
        step = static_decode.DecodeStep(model, static_decode.static_decode_cache(cache, mask, width + 2),
                                        pos[:, -1:], graphs=False)
        with static_attention.decode_attention(model):
            step(torch.tensor([5, 6, 7]))
            step(torch.tensor([5, 6, 7]))
            with pytest.raises(RuntimeError, match="past the cache's capacity"):
                step(torch.tensor([5, 6, 7]))
