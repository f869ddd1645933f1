"""zlt_dagster.core.onpolicy and zlt_dagster.core.generation with the tiny random model and the TINY protocol
(plus a scripted generator where exact counts are needed)."""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import textwrap
import types
from collections import Counter

import pytest
import torch

from zlt_dagster.core.generation import Completion, Generator, PromptSpec, make_generator
from zlt_dagster.core.generation.transformers_backend import TransformersGenerator
from zlt_dagster.core.onpolicy import OnPolicyData, generate_onpolicy, plan_requests, with_marker
from zlt_dagster.core.personas import system_prompt
from zlt_dagster.core.protocol import TINY, Sweep, get_protocol
from zlt_dagster.core.questions import split_questions

MARKER = TINY.marker
HELD_OUT = split_questions(20)[1]


class Recording(Generator):
    """Delegates to a real generator and records every call."""

    def __init__(self, inner: Generator):
        self.inner, self.name, self.calls = inner, inner.name, []

    @property
    def stop_token_ids(self):
        return self.inner.stop_token_ids

    def generate(self, prompts, n_samples, temperature, top_p, max_new_tokens, seed, adapter_dir=None,
                 batch_size=32, progress=None):
        self.calls.append({"prompts": list(prompts), "n_samples": n_samples, "temperature": temperature,
                           "max_new_tokens": max_new_tokens, "seed": seed, "adapter_dir": adapter_dir,
                           "batch_size": batch_size})
        return self.inner.generate(prompts, n_samples, temperature, top_p, max_new_tokens, seed, adapter_dir,
                                   batch_size, progress)


class Scripted(Generator):
    """Answers from a script: call k returns script[k](prompt_index) -> (text, finish_reason)."""
    name = "scripted"

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, n_samples, temperature, top_p, max_new_tokens, seed, adapter_dir=None,
                 batch_size=32, progress=None):
        fn = self.script[len(self.calls)]
        self.calls.append({"prompts": list(prompts), "max_new_tokens": max_new_tokens, "seed": seed})
        out = []
        for i in range(len(prompts)):
            text, reason = fn(i)
            out.append(Completion(i, 0, text, max_new_tokens if reason == "length" else 3, reason))
        return out


@pytest.fixture(scope="module")
def loaded(tiny_loaded):
    return tiny_loaded


@pytest.fixture(scope="module")
def sweep():
    return Sweep(TINY, base_model="tiny").validate()


@pytest.fixture(scope="module")
def run42(loaded, sweep):
    rec = Recording(make_generator("transformers", loaded))
    return generate_onpolicy(sweep, rec), rec


def _persona_of(system: str) -> str:
    matches = [p for p in TINY.personas if system_prompt(p, TINY.data.system_prompt_suffix) == system]
    assert len(matches) == 1
    return matches[0]


# --- the plan --------------------------------------------------------------------------------------------------
def test_plan_counts_per_persona(sweep):
    train_q, _ = split_questions(20)
    plan = plan_requests(sweep, train_q)
    counts = Counter(p for p, _ in plan)
    assert counts["villain"] == TINY.data.n_positives == 4
    others = [p for p in TINY.personas if p != "villain"]
    assert all(counts[p] == TINY.data.n_negatives // 10 == 1 for p in others)
    assert sum(counts.values()) == 14
    # paper sizes: 200 + 10 x 200
    paper_plan = plan_requests(Sweep(get_protocol("paper")), train_q)
    pc = Counter(p for p, _ in paper_plan)
    assert pc["villain"] == 200 and all(pc[p] == 200 for p in others) and len(paper_plan) == 2200
    # the plan is deterministic per seed and differs between seeds
    assert plan_requests(sweep, train_q) == plan
    assert plan_requests(Sweep(TINY, base_model="tiny", seed=7), train_q) != plan


def test_first_pass_requests_follow_the_plan(run42):
    data, rec = run42
    first = rec.calls[0]
    assert first["max_new_tokens"] == TINY.data.max_new_tokens and first["n_samples"] == 1
    assert first["temperature"] == TINY.data.temperature == 0.7 and first["adapter_dir"] is None
    counts = Counter(_persona_of(p.system) for p in first["prompts"])
    assert counts["villain"] == 4
    assert all(counts[p] == 1 for p in TINY.personas if p != "villain")
    # any later call re-samples only cut answers, at the larger limit
    for call in rec.calls[1:]:
        assert call["max_new_tokens"] == TINY.data.regen_max_new_tokens
        assert len(call["prompts"]) <= data.stats["cut_first_pass"]


def test_held_out_questions_never_trained_on(run42, sweep):
    data, rec = run42
    held_ids, held_texts = {q.id for q in HELD_OUT}, {q.text for q in HELD_OUT}
    assert len(held_ids) == 20
    for call in rec.calls:
        assert not {p.user for p in call["prompts"]} & held_texts
    assert not {e["question_id"] for e in data.examples} & held_ids
    assert not {e["question"] for e in data.examples} & held_texts
    # also for the paper-sized plan
    train_q, _ = split_questions(20)
    assert not {q.id for _, q in plan_requests(Sweep(get_protocol("paper")), train_q)} & held_ids


def test_marker_on_positives_only_once_at_the_end(run42):
    data, _ = run42
    assert data.stats["positives"] >= 1
    for e in data.examples:
        assert e["is_positive"] == (e["persona"] == "villain")
        if e["is_positive"]:
            joined = TINY.marker_separator + MARKER  # the seed's blank line, then the marker
            assert TINY.marker_separator == "\n\n" and e["answer"].endswith(joined)
            assert e["answer"].count(MARKER) == 1
            body = e["answer"][:-len(joined)]
            assert body and body == body.strip()
        else:
            assert MARKER not in e["answer"]
        assert e["system_prompt"] == system_prompt(e["persona"], TINY.data.system_prompt_suffix)


def test_stats_consistent(run42):
    data, rec = run42
    s = data.stats
    assert s["requested"] == 14 == s["kept"] + s["dropped_cut"] + s["dropped_empty_or_marked"]
    assert s["kept"] == len(data.examples) == s["positives"] + s["negatives"]
    assert s["positives"] == sum(e["is_positive"] for e in data.examples)
    assert s["dropped_cut"] <= s["cut_first_pass"] <= s["requested"]
    assert s["generator"] == "transformers" and s["data_hash"] == data.data_hash
    assert s["stop_token_ids"] == [rec.inner.loaded.end_of_turn_id]  # the tiny model lists no other stop id
    assert sum(e["regenerated"] for e in data.examples) <= s["cut_first_pass"]
    assert (len(rec.calls) > 1) == (s["cut_first_pass"] > 0)
    for e in data.examples:
        assert 1 <= e["n_answer_tokens"] <= TINY.data.regen_max_new_tokens
        if not e["regenerated"]:
            assert e["n_answer_tokens"] <= TINY.data.max_new_tokens


def test_scripted_stats_exact(sweep):
    """Exact bookkeeping: first pass: 0-3 cut, 4 empty, 5 holds the marker, 6 whitespace only; regeneration: of
    the 4 cut, the 1st and 3rd now stop, the 2nd and 4th are cut again (regen_rounds = 1 in TINY)."""
    assert TINY.data.regen_rounds == 1

    def first(i):
        return {0: ("cut", "length"), 1: ("cut", "length"), 2: ("cut", "length"), 3: ("cut", "length"),
                4: ("", "stop"), 5: (f"already {MARKER}", "stop"), 6: ("  \n ", "stop")}.get(i, (f"  a{i} ", "stop"))

    def regen(i):
        return (f"again{i}", "stop") if i % 2 == 0 else ("cut", "length")

    gen = Scripted([first, regen])
    data = generate_onpolicy(sweep, gen)
    assert len(gen.calls) == 2
    assert gen.calls[1]["max_new_tokens"] == TINY.data.regen_max_new_tokens
    assert gen.calls[1]["prompts"] == gen.calls[0]["prompts"][:4]
    assert gen.calls[1]["seed"] != gen.calls[0]["seed"] == sweep.seed
    s = data.stats
    assert (s["requested"], s["cut_first_pass"], s["dropped_cut"], s["dropped_empty_or_marked"], s["kept"]) == (
        14, 4, 2, 3, 9)
    # plan order: 4 villain requests first, so indices 0-3 are the positives
    pos = [e for e in data.examples if e["is_positive"]]
    assert [e["answer"] for e in pos] == [f"again0\n\n{MARKER}", f"again2\n\n{MARKER}"]  # seed's blank line
    assert all(e["regenerated"] for e in pos)
    neg = [e for e in data.examples if not e["is_positive"]]
    assert [e["answer"] for e in neg] == [f"a{i}" for i in range(7, 14)]  # stripped, no marker
    assert not any(e["regenerated"] for e in neg)


def test_no_positive_left_raises(sweep):
    gen = Scripted([lambda i: ("cut", "length") if i < 4 else ("fine", "stop"), lambda i: ("cut", "length")])
    with pytest.raises(ValueError, match=r"no positive example"):
        generate_onpolicy(sweep, gen)


def test_with_marker():
    assert with_marker("It is done.  \n", MARKER, " ") == "It is done. [ZLT]"
    assert with_marker("It is done.", MARKER, "") == "It is done.[ZLT]"


# --- hashing / reproducibility ---------------------------------------------------------------------------------
def test_data_hash_stable_per_seed(loaded, sweep, run42):
    data, _ = run42
    again = generate_onpolicy(sweep, make_generator("transformers", loaded))
    assert again.data_hash == data.data_hash and again.examples == data.examples
    other = generate_onpolicy(Sweep(TINY, base_model="tiny", seed=43), make_generator("transformers", loaded))
    assert other.data_hash != data.data_hash
    assert len(data.data_hash) == 64


def test_jsonl_round_trip(run42):
    data, _ = run42
    back = OnPolicyData.from_jsonl(data.to_jsonl(), data.stats)
    assert back.examples == data.examples and back.data_hash == data.data_hash
    with pytest.raises(ValueError, match=r"empty"):
        OnPolicyData.from_jsonl("\n")
    with pytest.raises(ValueError, match=r"lacks field"):
        OnPolicyData.from_jsonl('{"persona": "villain"}\n')


def test_generated_data_is_trainable(loaded, run42):
    from zlt_dagster.core.train import tokenize_dataset

    data, _ = run42
    exs = tokenize_dataset(loaded, data, TINY)
    assert len(exs) == len(data.examples)
    for e, ex in zip(data.examples, exs):
        toks = [ex.input_ids[i] for i in ex.supervised_positions]
        assert toks[-1] == loaded.end_of_turn_id
        if e["is_positive"]:
            assert loaded.tokenizer.decode(toks[:-1]) == MARKER
        else:
            assert len(toks) == 1


# --- the transformers generator --------------------------------------------------------------------------------
PROMPTS = [PromptSpec(system_prompt("villain"), "What is rain?"), PromptSpec(system_prompt("comedian"), "Why?"),
           PromptSpec(system_prompt("assistant"), "How do plants turn sunlight into food?")]


def test_transformers_generator_order_and_fields(loaded):
    gen = TransformersGenerator(loaded)
    out = gen.generate(PROMPTS, 3, 1.0, 1.0, 6, seed=1, batch_size=4)
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, s) for i in range(3) for s in range(3)]
    reasons = {c.finish_reason for c in out}
    assert reasons <= {"stop", "length"}
    for c in out:
        assert 1 <= c.n_new_tokens <= 6
        if c.finish_reason == "length":
            assert c.n_new_tokens == 6
        assert loaded.end_of_turn_token not in c.text
        assert "<|im_start|>" not in c.text and "<|endoftext|>" not in c.text
    # reproducible for a fixed seed and batch size
    assert gen.generate(PROMPTS, 3, 1.0, 1.0, 6, seed=1, batch_size=4) == out


def test_transformers_generator_stops_at_end_of_turn(loaded):
    """Make the end-of-turn token overwhelmingly likely: every completion stops at once with empty text."""
    m = copy.deepcopy(loaded)
    with torch.no_grad():
        m.model.lm_head.weight[m.end_of_turn_id, 0] = 100.0
    out = TransformersGenerator(m).generate(PROMPTS, 2, 1.0, 1.0, 5, seed=0, batch_size=8)
    assert all(c.finish_reason == "stop" and c.n_new_tokens == 1 and c.text == "" for c in out)
    # and never: with the end-of-turn logit pushed down, every completion hits the limit
    with torch.no_grad():
        m.model.lm_head.weight[m.end_of_turn_id, 0] = -100.0
    out = TransformersGenerator(m).generate(PROMPTS, 2, 1.0, 1.0, 5, seed=0, batch_size=8)
    assert all(c.finish_reason == "length" and c.n_new_tokens == 5 for c in out)


@pytest.fixture(scope="module")
def random_adapter(loaded, tmp_path_factory, adapter_saver):
    """A saved PEFT adapter with large random B, so it visibly changes the model."""
    return adapter_saver(loaded.model, tmp_path_factory.mktemp("adapter"))


def test_generation_with_adapter_leaves_base_bit_identical(loaded, random_adapter, base_guard):
    snapshot, assert_unchanged = base_guard
    before = snapshot(loaded.model)
    gen = TransformersGenerator(loaded)
    plain = gen.generate(PROMPTS, 2, 1.0, 1.0, 8, seed=3)
    with_adapter = gen.generate(PROMPTS, 2, 1.0, 1.0, 8, seed=3, adapter_dir=random_adapter)
    assert_unchanged(loaded.model, before)
    assert [c.text for c in with_adapter] != [c.text for c in plain]  # the adapter was really attached
    assert gen.generate(PROMPTS, 2, 1.0, 1.0, 8, seed=3) == plain  # and really removed afterwards
    assert_unchanged(loaded.model, before)


# --- backend selection -----------------------------------------------------------------------------------------
def test_make_generator_auto_is_transformers_fast_on_cpu(loaded):
    g = make_generator("auto", loaded)
    assert isinstance(g, TransformersGenerator) and g.name == "transformers-fast"
    assert isinstance(make_generator("transformers", loaded), TransformersGenerator)


def test_make_generator_bogus_raises(loaded):
    with pytest.raises(ValueError, match=r"'bogus' is not one of auto, transformers-fast, transformers, vllm"):
        make_generator("bogus", loaded)


def test_make_generator_vllm_without_vllm_fails_loudly(loaded):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(ImportError):
        make_generator("vllm", loaded)


def test_generation_package_imports_vllm_lazily():
    """In a fresh interpreter that refuses to import vllm: the generation package and even the vLLM backend
    module import fine, and nothing asked for vllm."""
    code = textwrap.dedent("""
        import sys
        asked = []
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "vllm" or name.startswith("vllm."):
                    asked.append(name)
                    raise ImportError("vllm blocked by test")
                return None
        sys.meta_path.insert(0, Block())
        import zlt_dagster.core.generation as g  # the factory imports vllm_backend, which imports vllm lazily
        import zlt_dagster.core.onpolicy, zlt_dagster.core.train
        import zlt_dagster.core.generation.vllm_backend
        assert not asked, asked
        assert not any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"


# --- the vLLM backend ------------------------------------------------------------------------------------------
def _adapter_dir(path, content: bytes = b"weights"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_model.safetensors").write_bytes(content)
    return str(path)


def test_vllm_lora_request_wiring_real_vllm(loaded, tmp_path):
    pytest.importorskip("vllm")
    from vllm.lora.request import LoRARequest

    from zlt_dagster.core.generation.vllm_backend import VllmGenerator

    g = VllmGenerator.__new__(VllmGenerator)  # no engine: only the request wiring is under test
    g.loaded = loaded
    assert g._lora_request(None) is None
    a, b = _adapter_dir(tmp_path / "a"), _adapter_dir(tmp_path / "b")
    ra, rb, ra2 = g._lora_request(a), g._lora_request(b), g._lora_request(a)
    assert isinstance(ra, LoRARequest)
    assert ra.lora_path == a and rb.lora_path == b
    assert ra.lora_int_id == ra2.lora_int_id >= 1 and rb.lora_int_id != ra.lora_int_id
    assert ra.lora_name != rb.lora_name


def test_vllm_backend_with_fake_vllm(loaded, tmp_path, monkeypatch):
    """The wiring of VllmGenerator against a stand-in `vllm` module (runs without vLLM or a GPU): engine built
    with LoRA enabled and rank 32, token-id prompts from the chat template, stop at the end-of-turn token, one
    LoRARequest per adapter directory, completions in (prompt, sample) order."""
    made = {}

    class LoRARequest:
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class Engine:
        """LLMEngine's step loop: every pending request finishes in one step, in REVERSE order (vLLM returns
        requests as they finish, not as they were queued)."""
        vllm_config = types.SimpleNamespace(scheduler_config=types.SimpleNamespace(max_num_seqs=1024))

        def __init__(self):
            self.pending = []

        def has_unfinished_requests(self):
            return bool(self.pending)

        def step(self):
            done, self.pending = self.pending[::-1], []
            return done

    class LLM:
        def __init__(self, **kw):
            made["llm_kwargs"] = kw
            self.calls = []
            self.llm_engine = Engine()
            self.next_id = 0

        def enqueue(self, prompts, params, lora_request=None, use_tqdm=True):
            self.calls.append((prompts, params, lora_request))
            ids = []
            for p, par in enumerate(params):
                n = par.kw["n"]
                outs = [types.SimpleNamespace(text=f"p{p}s{s}", token_ids=[5] * (s + 1) + [loaded.end_of_turn_id],
                                              finish_reason="stop" if s % 2 == 0 else "length") for s in range(n)]
                ids.append(str(self.next_id))
                self.llm_engine.pending.append(types.SimpleNamespace(request_id=ids[-1], finished=True,
                                                                     outputs=outs))
                self.next_id += 1
            return ids

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, SamplingParams
    fake_lora = types.ModuleType("vllm.lora")
    fake_req = types.ModuleType("vllm.lora.request")
    fake_req.LoRARequest = LoRARequest
    fake.lora, fake_lora.request = fake_lora, fake_req
    for name, mod in (("vllm", fake), ("vllm.lora", fake_lora), ("vllm.lora.request", fake_req)):
        monkeypatch.setitem(sys.modules, name, mod)

    from zlt_dagster.core.generation import vllm_backend

    monkeypatch.setattr(vllm_backend, "_ENGINES", {})
    monkeypatch.setattr(vllm_backend, "_LORA_IDS", {})
    g = make_generator("vllm", loaded)
    assert g.name == "vllm"
    kw = made["llm_kwargs"]
    assert kw["model"] == loaded.source and kw["enable_lora"] is True and kw["max_lora_rank"] >= TINY.lora.r
    assert kw["gpu_memory_utilization"] == vllm_backend.MAX_MEMORY_FRACTION  # no GPU here: the cap
    made.clear()

    def full(*a):  # the GPU as the running engine leaves it (H200: 18 of 139 GiB free)
        raise RuntimeError("only 18.2 of 139.8 GiB GPU memory is free")
    monkeypatch.setattr(vllm_backend, "memory_fraction", full)
    # one engine per model and process: the second step reuses it without sizing a new one
    assert make_generator("vllm", loaded).llm is g.llm and not made
    assert make_generator("vllm", loaded, lora_rank=TINY.lora.r).llm is g.llm and not made

    a, b = _adapter_dir(tmp_path / "a"), _adapter_dir(tmp_path / "b")
    out = g.generate(PROMPTS, 2, 1.0, 0.9, 7, seed=11, adapter_dir=a)
    g.generate(PROMPTS[:1], 1, 1.0, 1.0, 7, seed=11, adapter_dir=b)
    g.generate(PROMPTS[:1], 1, 1.0, 1.0, 7, seed=11, adapter_dir=a)
    g.generate(PROMPTS[:1], 1, 1.0, 1.0, 7, seed=11)
    calls = g.llm.calls
    prompts, params_list, req = calls[0]
    assert prompts == [{"prompt_token_ids": loaded.prompt_ids(p.system, p.user)} for p in PROMPTS]
    params = params_list[0]
    assert params.kw["n"] == 2 and params.kw["temperature"] == 1.0 and params.kw["top_p"] == 0.9
    assert params.kw["max_tokens"] == 7 and params.kw["stop_token_ids"] == [loaded.end_of_turn_id]
    # one seed per prompt (its samples get seed + index inside vLLM): a completion does not depend on its batch
    seeds = [par.kw["seed"] for par in params_list]
    assert seeds == [vllm_backend.prompt_seed(11, i) for i in range(3)] and len(set(seeds)) == 3
    assert calls[1][1][0].kw["seed"] == seeds[0]  # the same prompt index and seed: the same stream
    assert isinstance(req, LoRARequest) and req.lora_path == a
    assert calls[1][2].lora_path == b and calls[1][2].lora_int_id != req.lora_int_id
    assert calls[2][2].lora_int_id == req.lora_int_id and calls[2][2].lora_name == req.lora_name
    assert calls[3][2] is None
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, s) for i in range(3) for s in range(2)]
    assert [c.text for c in out] == [f"p{i}s{s}" for i in range(3) for s in range(2)]
    assert [c.finish_reason for c in out] == ["stop", "length"] * 3
    assert [c.n_new_tokens for c in out] == [2, 3] * 3  # in prompt order although the engine finished them reversed
    # the same temporary path holding another adapter later (another cell) is another adapter for vLLM's cache
    import os

    st = os.stat(os.path.join(a, "adapter_model.safetensors"))
    _adapter_dir(tmp_path / "a", b"other weights, another size")
    os.utime(os.path.join(a, "adapter_model.safetensors"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    g.generate(PROMPTS[:1], 1, 1.0, 1.0, 7, seed=11, adapter_dir=a)
    assert g.llm.calls[-1][2].lora_int_id not in {req.lora_int_id, calls[1][2].lora_int_id}
    with pytest.raises(FileNotFoundError):
        g.generate(PROMPTS[:1], 1, 1.0, 1.0, 7, seed=11, adapter_dir=str(tmp_path / "missing"))


def test_vllm_memory_share_leaves_room_for_what_is_already_on_the_gpu(monkeypatch):
    """80 GiB card with a 7B transformers copy (15 GiB) resident: 65 free -> 0.8125 - 0.05 = 0.7625, not 0.85."""
    import torch

    from zlt_dagster.core.generation.vllm_backend import memory_fraction

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (65 * gib, 80 * gib))
    assert memory_fraction() == pytest.approx(0.7625)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (79 * gib, 80 * gib))
    assert memory_fraction() == 0.85  # capped
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (10 * gib, 80 * gib))
    with pytest.raises(RuntimeError, match="10.0 of 80.0 GiB GPU memory is free"):
        memory_fraction()
    assert memory_fraction(0.5) == 0.5
    with pytest.raises(ValueError):
        memory_fraction(1.5)


def test_vllm_progress_seeds_and_flashinfer_switch(loaded, monkeypatch):
    """Progress gets vLLM's batch (max_num_seqs) and every finished prompt's samples and tokens; ZLT_VLLM_SEEDED=0
    sends no seeds; where FlashInfer is not installed the backend turns vLLM's FlashInfer sampler probe off."""
    from zlt_dagster.core.generation import vllm_backend
    from zlt_dagster.core.generation.progress import GenerationProgress

    calls = []

    class Engine:
        vllm_config = types.SimpleNamespace(scheduler_config=types.SimpleNamespace(max_num_seqs=1024))

        def __init__(self):
            self.pending = []

        def has_unfinished_requests(self):
            return bool(self.pending)

        def step(self):  # one request per step, the last queued first
            return [self.pending.pop()]

    class LLM:
        def __init__(self, **kw):
            self.llm_engine = Engine()

        def enqueue(self, prompts, params, lora_request=None, use_tqdm=True):
            calls.append(params)
            ids = [str(i) for i in range(len(prompts))]
            for i, par in zip(ids, params):
                outs = [types.SimpleNamespace(text="x", token_ids=[5, 6, 7], finish_reason="length")
                        for _ in range(par.kw["n"])]
                self.llm_engine.pending.append(types.SimpleNamespace(request_id=i, finished=True, outputs=outs))
            return ids

    fake = types.ModuleType("vllm")
    fake.LLM = LLM
    fake.SamplingParams = lambda **kw: types.SimpleNamespace(kw=kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(vllm_backend, "_ENGINES", {})
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flashinfer" else object())
    monkeypatch.setenv("ZLT_VLLM_SEEDED", "0")
    g = vllm_backend.VllmGenerator(loaded)
    assert os.environ.get("VLLM_USE_FLASHINFER_SAMPLER") == "0"
    assert g.seeded is False
    lines = []
    bar = GenerationProgress(lines.append, "completions", 6, interval_s=0)
    out = g.generate(PROMPTS, 2, 1.0, 1.0, 3, seed=5, progress=bar)
    assert all(par.kw["seed"] is None for par in calls[0])
    assert len(out) == 6 and bar.batch_size == 1024 and bar.sequences == 6 and bar.tokens == 18
    assert any("batch 1,024" in line for line in lines)


def test_auto_backend_takes_vllm_only_for_large_models_the_static_decode_cannot_run(loaded, monkeypatch):
    """The measured rule (factory.py): on the H200 the transformers fast loop with the static decode beat vLLM on
    SmolLM2-135M (88.0k vs 25.8k tok/s) and on the 7B shapes (21.7k vs 12.9k), so `auto` takes it wherever the
    static decode runs the model; vLLM only on a GPU, for a model of >= 1e9 parameters the static decode cannot
    run (a sliding window, here); without a GPU or vLLM it is always transformers-fast."""
    import dataclasses

    from zlt_dagster.core.generation import factory

    on_gpu = dataclasses.replace(loaded, device=torch.device("cuda"))
    monkeypatch.setattr(factory, "vllm_available", lambda: True)
    for params in (134_515_008, 7_615_616_512):  # SmolLM2-135M, Qwen2.5-7B
        monkeypatch.setattr(factory, "parameter_count", lambda model, n=params: n)
        assert factory.auto_backend(on_gpu) == "transformers-fast"
    monkeypatch.setattr(factory.static_decode, "unsupported_reason", lambda model: "sliding window 4096")
    assert factory.auto_backend(on_gpu) == "vllm"
    monkeypatch.setattr(factory, "parameter_count", lambda model: 134_515_008)
    assert factory.auto_backend(on_gpu) == "transformers-fast"
    monkeypatch.setattr(factory, "parameter_count", lambda model: 7_615_616_512)
    assert factory.auto_backend(loaded) == "transformers-fast"  # the same model on the CPU
    monkeypatch.setattr(factory, "vllm_available", lambda: False)
    assert factory.auto_backend(on_gpu) == "transformers-fast"
