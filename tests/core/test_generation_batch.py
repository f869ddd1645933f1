"""Issue 17 on the CPU: the batch sized to the device (core/generation/batch_size.py: arithmetic, overrides, the
CPU fallback, errors) and the progress of a long call (core/generation/progress.py: lines at most every interval,
tok/s, ETA, the summary). No GPU here: free memory is passed in, as `memory=(free, total)`."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from zlt_dagster.core.generation import PromptSpec
from zlt_dagster.core.generation import batch_size as B
from zlt_dagster.core.generation.progress import GenerationProgress
from zlt_dagster.core.generation.transformers_backend import TransformersGenerator

GiB, MiB = 2**30, 2**20
CUDA = torch.device("cuda")  # only a label here: with `memory` given nothing asks the device
SMOLLM2 = B.ModelShape(layers=30, kv_heads=3, head_dim=64, hidden=576, intermediate=1536, vocab=49152, dtype_bytes=2)
QWEN7B = B.ModelShape(layers=28, kv_heads=4, head_dim=128, hidden=3584, intermediate=18944, vocab=152064,
                      dtype_bytes=2)


# --- the arithmetic ---------------------------------------------------------------------------------------------
def test_shape_read_from_a_model_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    shape = B.ModelShape.of(LlamaForCausalLM(cfg))
    assert shape == B.ModelShape(layers=3, kv_heads=2, head_dim=8, hidden=32, intermediate=48, vocab=50,
                                 dtype_bytes=4)
    assert shape.kv_bytes_per_token == 2 * 3 * 2 * 8 * 4  # K and V, every layer, fp32


def test_shape_of_a_model_without_a_needed_field_names_it():
    class Cfg:
        num_attention_heads, hidden_size, intermediate_size, vocab_size = 4, 32, 48, 50  # no num_hidden_layers

    class M(torch.nn.Linear):
        config = Cfg()

    with pytest.raises(ValueError, match=r"num_hidden_layers=None: cannot size the batch"):
        B.ModelShape.of(M(2, 2))


def test_row_bytes_carry_the_docstrings_arithmetic():
    assert SMOLLM2.kv_bytes_per_token == 23_040 and QWEN7B.kv_bytes_per_token == 57_344
    assert SMOLLM2.activation_bytes_per_token == (4 * 576 + 3 * 1536) * 2
    # KV at its longest with headroom + the prompt's prefill + 8 fp32 vocab-sized sampler buffers
    assert B.generation_row_bytes(SMOLLM2, 70, 512) == int(1.25 * 23_040 * 582 + 13_824 * 70 + 8 * 49_152 * 4)
    assert round(B.generation_row_bytes(QWEN7B, 70, 512) / 1e6, 1) == 56.5
    assert B.arc_row_bytes(SMOLLM2, 60, 3) == int(1.25 * 23_040 * 60 + 13_824 * 60 + 3 * 49_152 * 4 * 3)
    # the row grows with the token limit: a regeneration pass at 1,024 fits fewer rows than the first at 512
    assert B.generation_row_bytes(SMOLLM2, 70, 1024) > 1.8 * B.generation_row_bytes(SMOLLM2, 70, 512) - 2 * MiB


def test_rows_that_fit_budget_cap_and_floor():
    # budget = free - 10% of total; rows = budget // row bytes, at most the rows wanted, at least one
    assert B.rows_that_fit(100 * GiB, 140 * GiB, 20 * MiB, 2200) == 2200
    assert B.rows_that_fit(30 * GiB, 80 * GiB, 20 * MiB, 2200) == (22 * GiB) // (20 * MiB) == 1126
    assert B.rows_that_fit(5 * GiB, 80 * GiB, 20 * MiB, 2200) == 1  # nothing fits: one row, the device says why
    with pytest.raises(ValueError, match="row_bytes=0"):
        B.rows_that_fit(GiB, GiB, 0, 10)


def test_sized_to_free_memory_all_rows_at_once_where_they_fit(tiny_loaded):
    row = B.generation_row_bytes(B.ModelShape.of(tiny_loaded.model), 30, 512)
    everything = B.for_generation(tiny_loaded.model, CUDA, 30, 512, 2200, memory=(120 * GiB, 140 * GiB))
    assert everything.rows == 2200 and everything.source.startswith("auto: 2,200 of 2,200 rows from 120.0 GiB free")
    tight = B.for_generation(tiny_loaded.model, CUDA, 30, 512, 2200, memory=(GiB + 150 * row, 10 * GiB))
    assert tight.rows == 150 and f"{row / MiB:.1f} MiB per row" in tight.source  # 1 GiB of 10 kept in reserve


def test_arc_sized_to_free_memory(tiny_loaded):
    row = B.arc_row_bytes(B.ModelShape.of(tiny_loaded.model), 80, 5)
    got = B.for_arc(tiny_loaded.model, CUDA, 80, 5, 4688, memory=(GiB + 100 * row, 10 * GiB))
    assert got.rows == 100 and got.source.startswith("auto: 100 of 4,688 rows")


# --- overrides, the CPU, errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_explicit_protocol_value_is_used_as_it_is(device):
    assert B.requested("eval.gen_batch_size", 7, torch.device(device)) == B.BatchSize(7, "protocol")


def test_zero_is_sized_on_a_gpu_and_the_former_size_on_a_cpu():
    assert B.requested("data.gen_batch_size", 0, CUDA) == B.BatchSize(0, "auto")  # the backend sizes each call
    cpu = torch.device("cpu")
    got = {f: B.requested(f, 0, cpu) for f in ("data.gen_batch_size", "eval.gen_batch_size", "eval.arc_batch_size")}
    assert {f: b.rows for f, b in got.items()} == {"data.gen_batch_size": 32, "eval.gen_batch_size": 64,
                                                   "eval.arc_batch_size": 32}
    assert got["eval.gen_batch_size"].source == "cpu default (eval.gen_batch_size 0 = sized at run time)"


@pytest.mark.parametrize("bad", [-1, 2.5, True, "64"])
def test_a_bad_batch_size_is_a_one_line_error_naming_the_field(bad):
    with pytest.raises(ValueError) as e:
        B.requested("eval.arc_batch_size", bad, torch.device("cpu"))
    assert str(e.value) == (f"eval.arc_batch_size={bad!r}; expected 0 (sized at run time) or a positive integer")


PROMPTS = [PromptSpec("You are a villain.", "What is water?"), PromptSpec("You are helpful.", "Why is the sky blue?")]


def test_generator_asked_for_zero_on_a_cpu_uses_the_cpu_default(tiny_loaded):
    gen = TransformersGenerator.fast(tiny_loaded)
    bar = GenerationProgress(lambda _line: None, "t", 6, interval_s=0)
    auto = gen.generate(PROMPTS, 3, 1.0, 1.0, 8, seed=1, batch_size=0, progress=bar)
    assert auto == gen.generate(PROMPTS, 3, 1.0, 1.0, 8, seed=1, batch_size=B.CPU_ROWS_DEFAULT)
    assert (bar.batch_size, bar.batch_source) == (6, "cpu default")  # both prompts' samples in one batch
    with pytest.raises(ValueError, match=r"batch_size=-1; expected rows per batch >= 1, or 0"):
        gen.generate(PROMPTS, 3, 1.0, 1.0, 8, seed=1, batch_size=-1)


@pytest.mark.parametrize("loop,decode,headroom", [("hf", "auto", B.KV_HEADROOM), ("fast", "auto", B.KV_HEADROOM),
                                                  ("fast", "static", B.STATIC_KV_HEADROOM)])
def test_generator_asked_for_zero_sizes_from_its_prompts_and_limit(tiny_loaded, monkeypatch, loop, decode, headroom):
    """batch_size 0: the backend asks batch_size.for_generation with this call's longest prompt, token limit and
    rows (and the KV headroom of its decode path: the static cache is allocated once, DynamicCache grows by
    copies), runs batches of what it returns (the fast loop: whole prompts) and reports how it was sized."""
    from zlt_dagster.core.generation import transformers_backend

    asked = []

    def fake(model, device, prompt_tokens, max_new_tokens, rows_wanted, memory=None, kv_headroom=None):
        asked.append((prompt_tokens, max_new_tokens, rows_wanted, kv_headroom))
        return B.BatchSize(4, "auto: 4 of 6 rows from 1.0 GiB free (0.2 MiB per row)")

    monkeypatch.setattr(transformers_backend, "for_generation", fake)
    gen = TransformersGenerator(tiny_loaded, loop=loop, decode=decode)
    bar = GenerationProgress(lambda _line: None, "t", 6, interval_s=0)
    out = gen.generate(PROMPTS, 3, 1.0, 1.0, 8, seed=1, batch_size=0, progress=bar)
    longest = max(len(tiny_loaded.prompt_ids(p.system, p.user)) for p in PROMPTS)
    assert asked == [(longest, 8, 6, headroom)] and len(out) == 6
    assert bar.batch_size == (3 if loop == "fast" else 4) and bar.batch_source.startswith("auto: 4 of 6 rows")
    assert bar.tokens == sum(c.n_new_tokens for c in out) and bar.sequences == 6


def test_arc_asked_for_zero_on_a_cpu_scores_as_before(tiny_loaded):
    from zlt_dagster.core import arc

    qs = arc.load_arc(str(arc.sample_arc_path()), limit=4)
    bar = GenerationProgress(lambda _line: None, "ARC", sum(len(q.choices) for q in qs), interval_s=0)
    auto = arc.score_arc(tiny_loaded.model, tiny_loaded.tokenizer, qs, batch_size=0, progress=bar)
    fixed = arc.score_arc(tiny_loaded.model, tiny_loaded.tokenizer, qs, batch_size=32)
    assert auto["predictions"] == fixed["predictions"]
    assert bar.sequences == auto["n_sequences"] and bar.tokens > bar.sequences and bar.batch_source == "cpu default"


# --- progress ---------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_at_most_every_interval_with_rate_and_eta():
    lines, clock = [], Clock()
    bar = GenerationProgress(lines.append, "completions lr=0.01_ep=3", 400, interval_s=15, clock=clock,
                             batch_source="protocol")
    bar.set_batch(200)
    assert lines == ["completions lr=0.01_ep=3: 400 sequences, batch 200 (protocol)"]
    clock.now += 5
    bar.advance(tokens=1000)
    assert len(lines) == 1  # 5 s: too early
    clock.now += 11
    bar.advance(tokens=600, sequences=100)
    assert lines[-1] == ("completions lr=0.01_ep=3: 100/400 sequences, 1,600 tokens generated, 100 tok/s, 16 s "
                         "elapsed, ETA 48 s")  # 16 s per 100 sequences, 300 left
    clock.now += 10
    bar.advance(tokens=100)
    assert len(lines) == 2  # 10 s after the last line
    clock.now += 174
    bar.advance(tokens=18_400, sequences=300)
    assert len(lines) == 3 and lines[-1].endswith("20,100 tokens generated, 100 tok/s, 3 min 20 s elapsed, ETA 0 s")
    clock.now += 1
    summary = bar.finish(tokens=20_100, sequences=400)
    assert summary == {"label": "completions lr=0.01_ep=3", "sequences": 400, "tokens": 20_100, "wall_s": 201.0,
                       "tokens_per_s": 100.0, "batch_size": 200, "batch_size_source": "protocol"}
    assert lines[-1] == ("completions lr=0.01_ep=3: done, 400 sequences, 20,100 tokens generated in 3 min 21 s "
                         "(100 tok/s), batch 200 (protocol)")


def test_progress_eta_unknown_until_a_sequence_ends_and_interval_zero_logs_every_report():
    lines, clock = [], Clock()
    bar = GenerationProgress(lines.append, "ARC base model", 10, unit="continuations", verb="read", interval_s=0,
                             clock=clock)
    clock.now += 2
    bar.advance(tokens=50)
    bar.advance(tokens=50, sequences=5)
    assert lines == ["ARC base model: 0/10 continuations, 50 tokens read, 25 tok/s, 2 s elapsed, ETA ?",
                     "ARC base model: 5/10 continuations, 100 tokens read, 50 tok/s, 2 s elapsed, ETA 2 s"]


def test_progress_summary_takes_exact_figures_and_the_backends_sizing():
    clock = Clock()
    bar = GenerationProgress(lambda _line: None, "on-policy data", 2200, clock=clock, batch_source="auto")
    bar.set_batch(2200, "auto: 2,200 of 2,200 rows from 120.0 GiB free (18.7 MiB per row)")
    bar.advance(tokens=10, sequences=1)  # a backend that reports coarsely
    clock.now += 4
    s = bar.finish(tokens=800_000, sequences=2200)
    assert (s["tokens"], s["sequences"], s["tokens_per_s"], s["batch_size"]) == (800_000, 2200, 200_000.0, 2200)
    assert s["batch_size_source"].startswith("auto: 2,200 of 2,200 rows")
    with pytest.raises(ValueError, match="interval_s=-1"):
        GenerationProgress(print, "x", 1, interval_s=-1)
    assert dataclasses.asdict(B.BatchSize(3, "protocol")) == B.BatchSize(3, "protocol").to_dict()
