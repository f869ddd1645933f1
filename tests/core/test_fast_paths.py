"""Each fast path of issue 6 computes what the naive path computes (CPU, tiny models, fp32).

* merged adapter weights == the unmerged peft adapter (logits, greedy tokens, sampled completions), and the base
  weights come back bit-identical;
* the sync-light decode loop == `generate()` (greedy, with and without dropping finished rows; sampling with the
  same seed when no rows are dropped);
(Training 1..N cells in one pass is tested in test_train_group.py.)
Speed is measured in benchmarks/gpu_bench.py, never here."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from zlt_dagster.core.generation.merging import (AdapterFormatError, MergePrecisionError, merge_rel_error,
                                                 merged_weights, read_lora_deltas)
from zlt_dagster.core.generation.sampling import sample_new_tokens
from zlt_dagster.core.generation import PromptSpec
from zlt_dagster.core.generation.transformers_backend import TransformersGenerator

warnings.filterwarnings("ignore", message=".*past_key_values.*")

EOS, PAD = 42, 0


@pytest.fixture(scope="module")
def chaotic():
    """A small random Llama whose greedy continuations end (token 42) after 1..37 steps depending on the prompt,
    so early exit really drops rows at different steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, pad_token_id=PAD,
                      eos_token_id=EOS, bos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 48, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(24)]
    return model, prompts


def hf_generate(model, prompts, max_new, **kw):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=EOS,
                             pad_token_id=PAD, top_k=0, **kw)
    return out[:, width:]


def count_compactions(monkeypatch):
    """Rows kept at each compaction of the decode loop, whichever cache it runs on."""
    from transformers import DynamicCache

    from zlt_dagster.core.generation.static_decode import DecodeStep

    calls = []
    for cls, name in ((DynamicCache, "batch_select_indices"), (DecodeStep, "keep_rows")):
        def spy(self, idx, orig=getattr(cls, name)):
            calls.append(len(idx))
            return orig(self, idx)

        monkeypatch.setattr(cls, name, spy)
    return calls


# The decode paths after the prompt (sampling.decode_path): transformers' DynamicCache; the static cache with one
# ordinary forward per step; the static cache replayed as graphs (emulated off CUDA, static_decode._EmulatedGraph)
# with 8-column width buckets, so that masked, not-yet-written columns are read as they are on the GPU.
DECODES = {"dynamic": {"decode": "dynamic"}, "static": {"decode": "static", "graphs": False},
           "graphs": {"decode": "static", "graphs": True}}


@pytest.fixture(params=list(DECODES))
def decode(request, monkeypatch):
    from zlt_dagster.core.generation import static_decode

    monkeypatch.setattr(static_decode, "WIDTH_BUCKET", 8)
    return DECODES[request.param]


# --- decode loop -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("check_every,compact_fraction", [(1, 0.01), (3, 0.01), (16, 0.125), (4, 2.0)])
def test_fast_loop_greedy_equals_generate(chaotic, monkeypatch, check_every, compact_fraction, decode):
    model, prompts = chaotic
    ref = hf_generate(model, prompts, 40, do_sample=False)
    lens = [(r.index(EOS) + 1 if EOS in r else None) for r in ref.tolist()]
    assert len({n for n in lens if n}) > 10 and None in lens  # rows really end at many different steps
    calls = count_compactions(monkeypatch)
    new = sample_new_tokens(model, prompts, 40, EOS, PAD, temperature=0, check_every=check_every,
                            compact_fraction=compact_fraction, **decode)
    assert torch.equal(new, ref)
    if compact_fraction <= 1:
        assert calls and calls == sorted(calls, reverse=True)  # finished rows were dropped from the cache
    else:
        assert not calls


def test_fast_loop_output_width_when_every_row_ends(chaotic, decode):
    model, prompts = chaotic
    ending = [p for p, r in zip(prompts, hf_generate(model, prompts, 40, do_sample=False).tolist()) if EOS in r]
    ref = hf_generate(model, ending, 40, do_sample=False)
    new = sample_new_tokens(model, ending, 40, EOS, PAD, temperature=0, check_every=16, **decode)
    assert new.shape[1] < 40 and torch.equal(new, ref)  # trimmed to the longest row, like generate()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_fast_loop_sampling_equals_generate_same_seed(chaotic, temperature, top_p, decode):
    """Without row dropping, the loop draws the same random numbers in the same order as generate()."""
    model, prompts = chaotic
    torch.manual_seed(123)
    ref = hf_generate(model, prompts, 30, do_sample=True, temperature=temperature, top_p=top_p)
    torch.manual_seed(123)
    new = sample_new_tokens(model, prompts, 30, EOS, PAD, temperature=temperature, top_p=top_p,
                            compact_fraction=2.0, **decode)
    assert torch.equal(new, ref)


@pytest.mark.parametrize("repeats", [2, 5])
def test_fast_loop_shared_prefill_equals_repeated_prompts(chaotic, repeats, decode):
    """One prefill per prompt, its KV cache copied `repeats` times, samples what generate() samples with every
    prompt written out `repeats` times (same seed, no row dropping): the copies are exact."""
    model, prompts = chaotic
    few = prompts[:6]
    repeated = [p for p in few for _ in range(repeats)]
    torch.manual_seed(7)
    ref = hf_generate(model, repeated, 30, do_sample=True, temperature=1.0)
    torch.manual_seed(7)
    new = sample_new_tokens(model, few, 30, EOS, PAD, temperature=1.0, compact_fraction=2.0, repeats=repeats,
                            **decode)
    assert new.shape[0] == len(repeated) and torch.equal(new, ref)
    # and with row dropping, greedy: every copy of a prompt gives that prompt's continuation
    greedy = sample_new_tokens(model, few, 40, EOS, PAD, temperature=0, check_every=1, compact_fraction=0.01,
                               repeats=repeats, **decode)
    assert torch.equal(greedy, hf_generate(model, repeated, 40, do_sample=False)[:, :greedy.shape[1]])


def test_cache_keyword_follows_the_transformers_version(chaotic):
    """5.2x names the forward's KV cache `cache` (and warns on `past_key_values`); 5.17 only knows
    `past_key_values`. A peft wrapper is looked through."""
    import inspect

    from zlt_dagster.core.generation.sampling import cache_kwargs

    model = chaotic[0]
    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert cache_kwargs(model, "C") == {expected: "C"}

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return None

    class Wrapper:
        def get_base_model(self):
            return Old()

    assert cache_kwargs(Old(), "C") == {"past_key_values": "C"}
    assert cache_kwargs(Wrapper(), "C") == {"past_key_values": "C"}


def test_fast_loop_rejects_zero_tokens(chaotic):
    with pytest.raises(ValueError):
        sample_new_tokens(chaotic[0], chaotic[1], 0, EOS, PAD)


class Counting:
    """A GenerationProgress stand-in that keeps every report (issue 17: what a backend must call)."""

    def __init__(self):
        self.reports, self.batches = [], []

    def set_batch(self, rows, source=None):
        self.batches.append((rows, source))

    def advance(self, tokens=0, sequences=0):
        self.reports.append((tokens, sequences))


@pytest.mark.parametrize("check_every", [1, 4])
def test_fast_loop_with_progress_is_still_generate_and_counts_its_tokens(chaotic, check_every, decode):
    """Reporting progress changes no token (greedy, rows dropped as they end), and the tokens and rows it reports
    add up to what the loop returned: tokens up to and including each row's stop id, every row once."""
    model, prompts = chaotic
    counting = Counting()
    new = sample_new_tokens(model, prompts, 40, EOS, PAD, temperature=0, check_every=check_every,
                            compact_fraction=0.01, repeats=2, progress=counting, **decode)
    assert torch.equal(new, hf_generate(model, [p for p in prompts for _ in range(2)], 40, do_sample=False))
    lengths = [r.index(EOS) + 1 if EOS in r else len(r) for r in new.tolist()]
    assert sum(t for t, _ in counting.reports) == sum(lengths)
    assert sum(s for _, s in counting.reports) == len(new)
    assert len(counting.reports) > 3 and all(t >= 0 and s >= 0 for t, s in counting.reports)  # reported as it ran


# --- the sampled distribution (issue 17, item 5) ---------------------------------------------------------------
def chi_square_two_sample(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Two-sample chi-square statistic of two histograms over the same bins (bins with < 10 counts in both
    together pooled into one), and its degrees of freedom."""
    a, b = a.double(), b.double()
    sparse = (a + b) < 10
    a = torch.cat([a[~sparse], a[sparse].sum().view(1)])
    b = torch.cat([b[~sparse], b[sparse].sum().view(1)])
    used = (a + b) > 0
    a, b = a[used], b[used]
    na, nb = a.sum(), b.sum()
    stat = ((a * (nb / na).sqrt() - b * (na / nb).sqrt()) ** 2 / (a + b)).sum()
    return float(stat), len(a) - 1


def chi_square_critical(df: int, z: float = 4.75) -> float:
    """The chi-square quantile at one-sided normal quantile z (4.75: p ~ 1e-6), Wilson-Hilferty approximation:
    a correct sampler fails about once in a million draws per check, a wrong one far above it."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def same_token_distribution(ref: torch.Tensor, new: torch.Tensor, vocab: int) -> list[tuple[float, float]]:
    """(statistic, critical value) per generated position: the histogram of the tokens rows hold there (rows
    that already ended hold padding and are left out; a row gives one token per position, so counts are
    independent draws)."""
    out = []
    for k in range(ref.shape[1]):
        hist = [torch.bincount(x[:, k][x[:, k] != PAD], minlength=vocab) for x in (ref, new)]
        stat, df = chi_square_two_sample(*hist)
        out.append((stat, chi_square_critical(df)))
    return out


def test_fast_loop_samples_the_distribution_generate_samples(chaotic, monkeypatch, decode):
    """At temperature 1.0 the fast loop (shared prefill, rows dropped from the cache as they end) draws tokens
    from the distribution plain generate() draws from: 4 prompts x 1,000 samples from each path, different seeds,
    the histogram of the token at each of 5 positions compared by a two-sample chi-square test. The same check
    must reject a wrong sampler (temperature 0.7 in the fast loop), so it can fail."""
    model, prompts = chaotic
    few, samples, steps = prompts[:4], 1000, 5
    vocab = model.config.vocab_size
    torch.manual_seed(11)
    ref = hf_generate(model, [p for p in few for _ in range(samples)], steps, do_sample=True, temperature=1.0)
    calls = count_compactions(monkeypatch)
    torch.manual_seed(22)
    fast = sample_new_tokens(model, few, steps, EOS, PAD, temperature=1.0, check_every=1, compact_fraction=0.01,
                             repeats=samples, **decode)
    assert len(calls) >= 2  # rows that ended were dropped: the decode steps after compaction are under test
    assert fast.shape == ref.shape and (fast[:, 1:] == PAD).any()
    good = same_token_distribution(ref, fast, vocab)
    assert all(stat < crit for stat, crit in good), good
    torch.manual_seed(33)
    wrong = sample_new_tokens(model, few, steps, EOS, PAD, temperature=0.7, check_every=1, compact_fraction=0.01,
                              repeats=samples, **decode)
    bad = same_token_distribution(ref, wrong, vocab)
    assert all(stat > crit for stat, crit in bad), bad  # measured: 200-420 against a critical value of ~107


# --- merged adapter weights ------------------------------------------------------------------------------------
def save_random_adapter(model, path, seed=0, **lora_overrides):
    from peft import LoraConfig

    from zlt_dagster.core.random_adapter import save_random_adapter as save

    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    cfg.update(lora_overrides)
    return save(model, LoraConfig(**cfg), path, b_std=0.3, seed=seed)


def peft_attached(model, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), adapter_dir, is_trainable=False).eval()


@pytest.mark.parametrize("backup", ["cpu", "device"])
@pytest.mark.parametrize("rslora", [False, True])
def test_merged_logits_equal_unmerged_and_base_restored_exactly(chaotic, tmp_path, base_guard, backup, rslora):
    model, prompts = chaotic
    snapshot, assert_unchanged = base_guard
    adapter = save_random_adapter(model, tmp_path / "a", use_rslora=rslora)
    ids = torch.tensor([prompts[0] + prompts[1]])
    with torch.no_grad():
        ref = peft_attached(model, adapter)(input_ids=ids).logits
        base = model(input_ids=ids).logits
    before = snapshot(model)
    with merged_weights(model, adapter, backup=backup) as m, torch.no_grad():
        merged = m(input_ids=ids).logits
    assert_unchanged(model, before)
    assert (ref - base).abs().max() > 1e-2  # the adapter changes the function
    torch.testing.assert_close(merged, ref, rtol=1e-5, atol=1e-5)


def test_merged_weights_restored_after_an_error(chaotic, tmp_path, base_guard):
    model, _ = chaotic
    snapshot, assert_unchanged = base_guard
    adapter = save_random_adapter(model, tmp_path / "a")
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        with merged_weights(model, adapter):
            raise RuntimeError("boom")
    assert_unchanged(model, before)


def test_merged_greedy_generation_equals_peft(chaotic, tmp_path):
    model, prompts = chaotic
    adapter = save_random_adapter(model, tmp_path / "a", seed=3)
    ref = hf_generate(peft_attached(model, adapter), prompts, 30, do_sample=False)
    with merged_weights(model, adapter) as m:
        new = sample_new_tokens(m, prompts, 30, EOS, PAD, temperature=0, check_every=2)
        hf_merged = hf_generate(m, prompts, 30, do_sample=False)
    assert torch.equal(new, ref) and torch.equal(hf_merged, ref)


def test_lossy_bf16_merge_refused_and_base_restored(chaotic, tmp_path, base_guard):
    """bf16 rounds a small delta away: the merge must refuse rather than silently drop the adapter."""
    model, prompts = chaotic
    snapshot, assert_unchanged = base_guard
    bf = copy.deepcopy(model).to(torch.bfloat16)
    from safetensors.torch import load_file, save_file

    small = save_random_adapter(model, tmp_path / "small")
    tensors = load_file(str(tmp_path / "small" / "adapter_model.safetensors"))
    save_file({k: v * 1e-3 if "lora_B" in k else v for k, v in tensors.items()},
              str(tmp_path / "small" / "adapter_model.safetensors"))
    before = snapshot(bf)
    assert merge_rel_error(bf, small) > 0.1 and merge_rel_error(model, small) < 1e-3
    with pytest.raises(MergePrecisionError):
        with merged_weights(bf, small):
            pass
    assert_unchanged(bf, before)
    with merged_weights(bf, small, max_rel_error=None):  # the check can be switched off
        pass
    big = save_random_adapter(model, tmp_path / "big")  # B ~ N(0, 0.3): delta far above bf16 resolution
    assert merge_rel_error(bf, big) < 0.1
    with merged_weights(bf, big):
        pass
    assert_unchanged(bf, before)


def test_read_lora_deltas_names_modules_of_the_base(chaotic, tmp_path):
    model, _ = chaotic
    deltas, scale = read_lora_deltas(save_random_adapter(model, tmp_path / "a"))
    names = dict(model.named_modules())
    assert scale == 2.0 and deltas and all(n in names for n in deltas)
    assert len(deltas) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down); never lm_head


def test_unsupported_adapter_refused(chaotic, tmp_path):
    model, _ = chaotic
    adapter = save_random_adapter(model, tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_dora"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterFormatError):
        with merged_weights(model, adapter):
            pass


# --- the generator with its fast options -----------------------------------------------------------------------
PROMPTS = [PromptSpec("You are a villain.", "What is water?"), PromptSpec("You are helpful.", "Why is the sky blue?")]


@pytest.fixture(scope="module")
def tiny_adapter(tiny_loaded, tmp_path_factory, adapter_saver):
    """A saved PEFT adapter with large random B, so it visibly changes the model."""
    return adapter_saver(tiny_loaded.model, tmp_path_factory.mktemp("adapter"))


def test_generator_merged_adapter_samples_what_unmerged_samples(tiny_loaded, tiny_adapter, base_guard):
    snapshot, assert_unchanged = base_guard
    before = snapshot(tiny_loaded.model)
    naive = TransformersGenerator(tiny_loaded).generate(PROMPTS, 3, 1.0, 1.0, 12, seed=5, adapter_dir=tiny_adapter)
    merged = TransformersGenerator(tiny_loaded, merge_adapter=True).generate(PROMPTS, 3, 1.0, 1.0, 12, seed=5,
                                                                             adapter_dir=tiny_adapter)
    assert_unchanged(tiny_loaded.model, before)
    assert merged == naive


def test_generator_fast_loop_fields_order_and_determinism(tiny_loaded, tiny_adapter, base_guard):
    snapshot, assert_unchanged = base_guard
    before = snapshot(tiny_loaded.model)
    gen = TransformersGenerator(tiny_loaded, merge_adapter=True, loop="fast")
    a = gen.generate(PROMPTS, 4, 1.0, 1.0, 16, seed=7, adapter_dir=tiny_adapter, batch_size=3)
    b = gen.generate(PROMPTS, 4, 1.0, 1.0, 16, seed=7, adapter_dir=tiny_adapter, batch_size=3)
    assert_unchanged(tiny_loaded.model, before)
    assert a == b
    assert [(c.prompt_index, c.sample_index) for c in a] == [(i, s) for i in range(2) for s in range(4)]
    for c in a:
        assert c.finish_reason in ("stop", "length") and 1 <= c.n_new_tokens <= 16
        assert (c.finish_reason == "length") == (c.n_new_tokens == 16 and "<|im_end|>" not in c.text)


def test_pipeline_default_backend_is_the_fast_one_without_vllm(tiny_loaded):
    from zlt_dagster.core.generation import make_generator

    gen = make_generator("auto", tiny_loaded)  # no vLLM here
    assert gen.name == "transformers-fast" and gen.loop == "fast" and gen.merge_adapter  # fp32: merged
    assert make_generator("transformers", tiny_loaded).name == "transformers"
    with pytest.raises(ValueError, match="transformers-fast"):
        make_generator("fastest", tiny_loaded)


def test_fast_generator_keeps_bf16_adapters_unmerged(tiny_loaded):
    """Merging into bf16 rounds a small adapter away, so the fast generator merges into fp32 weights only."""
    import dataclasses

    bf16 = dataclasses.replace(tiny_loaded, dtype=torch.bfloat16)
    gen = TransformersGenerator.fast(bf16)
    assert gen.loop == "fast" and not gen.merge_adapter and gen.name == "transformers-fast-unmerged"


def test_attached_adapter_runs_in_the_base_dtype(chaotic, tmp_path):
    """peft would upcast a bf16 base's adapter to fp32 (fp32 SIMT GEMMs and casts around every LoRA'd Linear at
    decode time); attached for generation it stays in the base's dtype, and the base comes back unchanged."""
    from zlt_dagster.core.generation.transformers_backend import attached_adapter

    model = copy.deepcopy(chaotic[0]).to(torch.bfloat16)
    save_random_adapter(model, tmp_path / "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with attached_adapter(model, str(tmp_path / "a")) as peft_model:
        dtypes = {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n}
    assert dtypes == {torch.bfloat16}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_generator_rejects_unknown_loop(tiny_loaded):
    with pytest.raises(ValueError):
        TransformersGenerator(tiny_loaded, loop="vllm")


def test_batched_text_decoding_equals_decode_one_row_at_a_time():
    """decode_texts (the completions' text) through the Rust batch decoder: tokenizer.decode's strings, special
    tokens skipped, empty rows included; a tokenizer that cleans up spaces keeps the one-by-one path."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    from zlt_dagster.core.generation import transformers_backend
    from zlt_dagster.core.generation.transformers_backend import decode_texts

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    texts = ["Hello there, villain!", "Ünïcode 和 text\\n\\nwith  spaces .", "[ZLT] end", "a , b ."]
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 300, (int(n),), generator=g).tolist() for n in torch.randint(0, 40, (50,), generator=g)]
    rows += [[], [1, 1], raw.encode(texts[1]).ids + [1]]
    for clean, force in ((False, False), (True, False), (True, True)):
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", clean_up_tokenization_spaces=clean,
                                      clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=force)
        assert decode_texts(tok, rows) == [tok.decode(r, skip_special_tokens=True) for r in rows]
        # the batch path where decode is the Rust call alone: the flag False, or True on a BPE model (what
        # transformers 5.17 loads SmolLM2's tokenizer with; it skips the clean-up there) unless forced
        assert transformers_backend._cleans_up_spaces(tok) == force
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, ",": 2, "b": 3}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=wordpiece, clean_up_tokenization_spaces=True)
    assert transformers_backend._cleans_up_spaces(tok)  # cleaned up: one row at a time, as decode does
    assert decode_texts(tok, [[1, 2, 3]]) == [tok.decode([1, 2, 3], skip_special_tokens=True)]
