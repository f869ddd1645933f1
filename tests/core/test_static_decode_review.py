"""Review of the static decode (core/generation/static_decode.py): models `unsupported_reason` accepted but the
static decode could not run, and what the existing tests did not pin down (CPU, tiny random models)."""
from __future__ import annotations

import warnings

import pytest
import torch

from zlt_dagster.core.generation import static_attention, static_decode
from zlt_dagster.core.generation.sampling import decode_path, sample_new_tokens

from tests.core.attention_paths import use_attention_path
from tests.core.test_static_decode import EOS, PAD, build, hf_greedy, prompts_for

warnings.filterwarnings("ignore", message=".*past_key_values.*")


def mixed_prompts() -> list[list[int]]:
    """Prompts of 1 to 30 tokens: rows start at very different columns of the static cache."""
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 48, (n,), generator=g).tolist() for n in (1, 30, 2, 17, 1, 9)]


@pytest.mark.parametrize("graphs,path", [(False, "sdpa"), (True, "sdpa"), (True, "flash"), (True, "triton")])
def test_static_decode_on_a_model_whose_layers_drop_forward_keywords(graphs, path, monkeypatch):
    """StableLm's (and Nemotron's) decoder layers call their attention without **kwargs, so the forward keyword
    zlt_decode never reaches the attention function. unsupported_reason accepts them (full attention, the
    AttentionInterface), so decode='auto' on CUDA chose the static decode and failed with 'decode attention needs
    the decode step's DecodeBatch'. The step's DecodeBatch now also reaches the attention function without it."""
    monkeypatch.setattr(static_decode, "WIDTH_BUCKET", 5)
    use_attention_path(monkeypatch, path)
    model = build("StableLmConfig", "StableLmForCausalLM")
    assert static_decode.unsupported_reason(model) is None
    prompts = mixed_prompts()
    ref = hf_greedy(model, prompts, 20)
    new = sample_new_tokens(model, prompts, 20, EOS, PAD, temperature=0, check_every=2, compact_fraction=0.01,
                            decode="static", graphs=graphs)
    assert torch.equal(new, ref[:, :new.shape[1]])


def test_decode_attention_outside_a_decode_step_still_fails_loudly():
    module = torch.nn.Module()
    q, k = torch.zeros(2, 4, 1, 8), torch.zeros(2, 5, 2, 8)
    with pytest.raises(RuntimeError, match="DecodeBatch"):
        static_attention.decode_attention_forward(module, q, k, k, None)


def tiny_deepseek_v3():
    return build("DeepseekV3Config", "DeepseekV3ForCausalLM", num_key_value_heads=6, q_lora_rank=16, kv_lora_rank=16,
                 qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=16, first_k_dense_replace=1, n_group=1, topk_group=1)


def test_multi_head_latent_attention_keeps_the_dynamic_loop():
    """DeepSeek-V2/V3-style MLA caches the compressed latents and expands them into K/V after the cache's update
    (expand_kv): the static cache's [rows, capacity, kv_heads, d] buffers are not what that code reads, and the
    static decode failed with a shape error deep in the model. unsupported_reason names it; auto keeps the
    DynamicCache loop (generate()'s tokens)."""
    model = tiny_deepseek_v3()
    assert "latent" in static_decode.unsupported_reason(model)
    with pytest.raises(ValueError, match="not possible for this model"):
        sample_new_tokens(model, prompts_for(48, 2), 4, EOS, PAD, decode="static")
    prompts = prompts_for(48, 4)
    assert torch.equal(sample_new_tokens(model, prompts, 8, EOS, PAD, temperature=0),
                       hf_greedy(model, prompts, 8)[:, :8])


def test_dynamic_rope_keeps_the_dynamic_loop():
    """rope_type 'dynamic' (NTK) recomputes its frequencies on the host from max(position_ids) in every forward
    (`if seq_len > max_seq_len_cached`: a device-to-host read, which a CUDA graph capture refuses) and replaces
    the inv_freq buffer (which a captured graph would not see): not for the static decode's captured step."""
    model = build("LlamaConfig", "LlamaForCausalLM", max_position_embeddings=16,
                  rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert "dynamic" in static_decode.unsupported_reason(model)
    assert decode_path(model).startswith("dynamic (")
    for rope in ({"rope_type": "default", "rope_theta": 10000.0},
                 {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16}):
        assert static_decode.unsupported_reason(build("LlamaConfig", "LlamaForCausalLM", rope_parameters=rope)) is None


_HOST_SYNCS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.nonzero.default",
               "aten.item.default", "aten.equal.default", "aten.masked_select.default"}


@pytest.mark.parametrize("kind,extra", [("llama", {}), ("qwen2", {}), ("llama", {"num_key_value_heads": 6}),
                                        ("qwen3", {"head_dim": 12})])
@pytest.mark.parametrize("path", ["sdpa", "flash", "triton"])
def test_the_captured_decode_forward_reads_nothing_back_to_the_host(kind, extra, path, monkeypatch):
    """What runs inside a CUDA graph capture (DecodeStep._forward) must not read a device value on the host (a
    capture refuses it; _EmulatedGraph cannot see it): no .item(), no tensor in an `if`, no nonzero."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) in _HOST_SYNCS:
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    # stand-in kernels that read nothing back (the flash reference loops on the host; the Triton interpreter copies
    # to NumPy): what is checked is the step's own code around them
    if path != "sdpa":
        monkeypatch.setattr(static_attention, "attention_choice", lambda *a: (path, ""))
        monkeypatch.setattr(static_attention, "flash_varlen", lambda q, k, v, *a: q.clone())
        monkeypatch.setattr(static_attention, "triton_decode", lambda q, k, v, *a: q.transpose(1, 2).clone())
    forward = static_decode.DecodeStep._forward

    def spied(self, *args):
        with Spy():
            return forward(self, *args)

    monkeypatch.setattr(static_decode.DecodeStep, "_forward", spied)
    cfg, cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[kind]
    sample_new_tokens(build(cfg, cls, **extra), mixed_prompts(), 6, EOS, PAD, temperature=0, check_every=2,
                      compact_fraction=0.01, decode="static", graphs=True)
    assert seen == []


CASES = ["mha", "head_dim", "tied", "repeats", "one_step", "several_eos"]


# the interpreted Triton kernel takes seconds a case: it runs the cases that change the attention's shapes only
@pytest.mark.parametrize("case,graphs,path", [(c, g, p) for c in CASES for g, p in (
    (False, "sdpa"), (True, "sdpa"), (True, "flash"))] + [(c, True, "triton") for c in ("mha", "head_dim")])
def test_static_greedy_equals_generate_over_shapes_and_loop_settings(case, graphs, path, monkeypatch):
    """generate()'s greedy tokens for prompts of 1 to 30 tokens, rows dropped at every check: MHA (heads ==
    kv_heads), head_dim set apart from hidden / heads, tied embeddings, repeats, max_new_tokens=1, several stop
    ids."""
    monkeypatch.setattr(static_decode, "WIDTH_BUCKET", 3)
    use_attention_path(monkeypatch, path)
    extra = {"mha": {"num_key_value_heads": 6}, "head_dim": {"head_dim": 12},
             "tied": {"tie_word_embeddings": True}}.get(case, {})
    model = build("LlamaConfig", "LlamaForCausalLM", **extra)
    prompts, max_new, eos, repeats = mixed_prompts(), 20, EOS, 1
    if case == "repeats":
        repeats = 3
    if case == "one_step":
        max_new = 1
    if case == "several_eos":
        eos = [EOS, 7, 11, 20]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos,
                             pad_token_id=PAD, do_sample=False)[:, width:].repeat_interleave(repeats, 0)
    new = sample_new_tokens(model, prompts, max_new, eos, PAD, temperature=0, check_every=1, compact_fraction=0.01,
                            repeats=repeats, decode="static", graphs=graphs)
    assert torch.equal(new, ref[:, :new.shape[1]])


def test_model_comes_back_unchanged_after_an_error_in_the_middle_of_the_static_decode():
    """An error at the 3rd decode step: the attention implementation is restored, and the model then generates
    generate()'s tokens again."""
    model = build("LlamaConfig", "LlamaForCausalLM", attn_implementation="eager")
    prompts = mixed_prompts()
    ref = hf_greedy(model, prompts, 8)
    calls = [0]

    def fail_later(module, args, kwargs):
        calls[0] += 1
        if calls[0] == 4:  # the prefill, then decode steps
            raise KeyError("boom")

    handle = model.register_forward_pre_hook(fail_later, with_kwargs=True)
    with pytest.raises(KeyError):
        sample_new_tokens(model, prompts, 8, EOS, PAD, temperature=0, decode="static", graphs=True)
    handle.remove()
    assert model.config._attn_implementation == "eager"
    assert torch.equal(hf_greedy(model, prompts, 8), ref)
