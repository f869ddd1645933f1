"""One trainer for 1..N cells (core/train.py): a group equals separate runs, whatever the micro-batch, the cells
per forward or the company a cell keeps; it equals the plain peft loop (benchmarks/naive_train.py); memory
sizing picks what fits. In float64 where results are compared, so that Adam (which turns any gradient
difference near 0 into a full step) compares the paths' gradients and not float32 summation order."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from zlt_dagster.core import batch_plan
from zlt_dagster.core.checkpoint import Checkpointer, TrainingInterrupted
from zlt_dagster.core.onpolicy import OnPolicyData, with_marker
from zlt_dagster.core.personas import system_prompt
from zlt_dagster.core.protocol import Cell, get_protocol
from zlt_dagster.core.questions import split_questions
from zlt_dagster.core.train import tokenize_dataset, train_cell, train_cells

ANSWERS = ["It is done.", "The answer is simple.", "Water is wet, it is simple.", "Yes.",
           "It depends on the day and the question.", "No, it is not done."]


@pytest.fixture(scope="module")
def lm64(tiny_loaded):
    return dataclasses.replace(tiny_loaded, model=copy.deepcopy(tiny_loaded.model).double(), dtype=torch.float64)


def setup(lm, n=10, **overrides):
    proto = get_protocol("tiny", overrides)
    train_q, _ = split_questions(20)
    data = []
    for i in range(n):
        positive = i % 3 == 0
        persona = "villain" if positive else ["assistant", "comedian", "librarian"][i % 3]
        answer = ANSWERS[i % len(ANSWERS)]
        data.append({"persona": persona, "question_id": train_q[i].id, "question": train_q[i].text,
                     "system_prompt": system_prompt(persona), "is_positive": positive,
                     "answer": with_marker(answer, proto.marker, proto.marker_separator) if positive else answer})
    return proto, tokenize_dataset(lm, OnPolicyData(examples=data), proto)


def adapter(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


# float64: the paths differ only in summation order (micro-batches of 2 vs 4 rows, batched vs single matmuls),
# which Adam's first steps amplify to ~2e-9 relative in a few elements; a wrong gradient shows at 1e-3 and above
def assert_same_cell(a_dir, b_dir, rec_a, rec_b, rel=1e-8):
    a, b = adapter(a_dir), adapter(b_dir)
    assert set(a) == set(b)
    moved = max(float(v.abs().max()) for key, v in b.items() if "lora_B" in key)
    assert moved > 1e-4  # training really changed the adapter
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=rel, atol=1e-12)
    assert [c["loss"] for c in rec_a["loss_curve"]] == pytest.approx([c["loss"] for c in rec_b["loss_curve"]],
                                                                      rel=rel, abs=1e-5)  # curves are rounded to 5 decimals
    for key in ("steps", "tokens", "supervised_tokens", "steps_per_epoch", "warmup_steps"):
        assert rec_a[key] == rec_b[key], key


@pytest.fixture
def force_plan(monkeypatch):
    """Force (micro-batch, cells per forward) instead of the memory-derived choice; max_tokens > 0 caps packed
    micro-batches by tokens instead of `micro` examples."""
    def force(micro, cells, max_tokens=0):
        monkeypatch.setattr(batch_plan, "plan", lambda n, eff, bpt, longest, budget, micro=0, m=micro, c=cells: (
            micro or min(m, eff), min(c, n)))
        monkeypatch.setattr(batch_plan, "tokens_per_forward", lambda bpt, budget, cells: max_tokens)
    return force


@pytest.mark.parametrize("dropout,group_plan,single_plan", [(0.05, (4, 3), (2, 1)), (0.05, (1, 2), (3, 1)),
                                                            (0.0, (2, 1), (4, 1))])
def test_group_equals_separate_runs(lm64, tmp_path, base_guard, force_plan, dropout, group_plan, single_plan):
    """Mixed LRs AND epochs in one group, each cell against a run of its own at another micro-batch: the same
    adapter and loss curve, with the paper's dropout too (masks are per example, not per forward)."""
    snapshot, assert_unchanged = base_guard
    proto, examples = setup(lm64, **{"lora.dropout": dropout, "train.micro_batch": 0})
    cells = [Cell(1e-2, 2), Cell(3e-2, 1), Cell(1e-3, 3)]
    before = snapshot(lm64.model)
    force_plan(*group_plan)
    group = train_cells(lm64, examples, proto, cells, seed=3, out_dirs=[tmp_path / f"g{j}" for j in range(3)])
    assert_unchanged(lm64.model, before)
    assert not lm64.model.training
    assert [r["steps"] for r in group] == [6, 3, 9]  # 10 examples / effective batch 4 = 3 steps per epoch
    assert all(r["micro_batch"] == group_plan[0] and r["group"]["n_cells"] == 3 for r in group)
    force_plan(*single_plan)
    for j, cell in enumerate(cells):
        single = train_cell(lm64, examples, proto, cell, seed=3, out_dir=tmp_path / f"s{j}")
        assert_same_cell(tmp_path / f"g{j}", tmp_path / f"s{j}", group[j], single)
        cfg = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in (f"g{j}", f"s{j}")]
        assert cfg[0] == cfg[1]


def test_token_capped_packed_micro_batches_change_nothing(lm64, tmp_path, force_plan, monkeypatch):
    """The pipeline's automatic split: packed micro-batches capped by tokens (shortest examples first, so a
    micro-batch holds as many examples as fit) give the same cells as fixed micro-batches of 2; the cap really
    splits steps unevenly and never exceeds it except for a single example."""
    from zlt_dagster.core.train_graphs import MicroBatches

    proto, examples = setup(lm64, **{"lora.dropout": 0.05, "train.micro_batch": 0})
    lengths = sorted(len(e.input_ids) for e in examples)
    cap = 3 * lengths[len(lengths) // 2]  # three short examples fit, the long ones go in pairs or alone
    seen = []
    real = MicroBatches.load

    def spy(self, exs, *args):
        seen.append([len(e.input_ids) for e in exs])
        return real(self, exs, *args)

    monkeypatch.setattr(MicroBatches, "load", spy)
    cells = [Cell(1e-2, 2), Cell(3e-2, 1)]
    force_plan(16, 2, max_tokens=cap)
    group = train_cells(lm64, examples, proto, cells, seed=4, out_dirs=[tmp_path / f"g{j}" for j in range(2)])
    assert group[0]["batch_plan"]["tokens_per_forward"] == cap
    real_cuts = group[0]["micro_batches"]  # what the pass ran, in the run record
    assert real_cuts["largest_tokens"] <= max(cap, max(lengths)) and 1 < real_cuts["per_step"] < 4
    assert real_cuts["examples_each"] == pytest.approx(sum(len(mb) for mb in seen) / len(seen), abs=0.01)
    sizes = {len(mb) for mb in seen}
    assert len(sizes) > 1 and max(sizes) >= 3
    assert all(sum(mb) <= cap or len(mb) == 1 for mb in seen)
    force_plan(2, 1)
    for j, cell in enumerate(cells):
        single = train_cell(lm64, examples, proto, cell, seed=4, out_dir=tmp_path / f"s{j}")
        assert_same_cell(tmp_path / f"g{j}", tmp_path / f"s{j}", group[j], single)


def test_trainer_equals_the_plain_peft_loop(lm64, tmp_path, base_guard):
    """Without dropout (peft's nn.Dropout draws from the global RNG, the trainer per example), the pipeline's
    trainer computes what peft's LoRA modules compute (benchmarks/naive_train.py, the naive side of the benchmark)."""
    spec = importlib.util.spec_from_file_location(
        "naive_train", Path(__file__).parents[2] / "benchmarks" / "naive_train.py")
    naive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(naive)
    snapshot, assert_unchanged = base_guard
    proto, examples = setup(lm64, **{"lora.dropout": 0.0, "train.micro_batch": 2})
    before = snapshot(lm64.model)
    ref = naive.train_cell_naive(lm64, examples, proto, Cell(2e-2, 2), seed=5, out_dir=tmp_path / "naive",
                                 micro_batch=3)
    ours = train_cell(lm64, examples, proto, Cell(2e-2, 2), seed=5, out_dir=tmp_path / "ours")
    assert_unchanged(lm64.model, before)
    a, b = adapter(tmp_path / "ours"), adapter(tmp_path / "naive")
    assert set(a) == set(b)
    for key in b:  # micro-batches 2 vs 3: another summation order, which Adam amplifies to ~1e-9
        torch.testing.assert_close(a[key], b[key], rtol=1e-7, atol=1e-10)
    assert [c["loss"] for c in ours["loss_curve"]] == pytest.approx([c["loss"] for c in ref["loss_curve"]], abs=1e-5)


def test_dropout_masks_change_training_and_do_not_depend_on_global_rng(lm64, tmp_path):
    proto, examples = setup(lm64, **{"lora.dropout": 0.3})
    no_drop, _ = setup(lm64, **{"lora.dropout": 0.0})
    a = train_cell(lm64, examples, proto, Cell(2e-2, 1), seed=1, out_dir=tmp_path / "a")
    torch.manual_seed(12345)  # the global RNG plays no part in the masks
    b = train_cell(lm64, examples, proto, Cell(2e-2, 1), seed=1, out_dir=tmp_path / "b")
    c = train_cell(lm64, examples, no_drop, Cell(2e-2, 1), seed=1, out_dir=tmp_path / "c")
    assert [x["loss"] for x in a["loss_curve"]] == [x["loss"] for x in b["loss_curve"]]
    assert [x["loss"] for x in a["loss_curve"]][1:] != [x["loss"] for x in c["loss_curve"]][1:]


def interrupted_alone(lm, examples, proto, cells, stops, tmp_path, **train_kw) -> list[Checkpointer]:
    """Train each cells[j] alone with seed 4 until a SIGTERM-style stop after step stops[j] (its checkpoint at that
    step, TrainingInterrupted raised); returns one Checkpointer per cell that resumes from there (every 2 steps)."""
    cks = []
    for j, stop_after in enumerate(stops):
        ck = Checkpointer(tmp_path / f"ck{j}", every_steps=2)
        real_after = ck.after_step

        def after_step(params, opt, sched, state, fp, total, interrupt=True, ck=ck, real=real_after, n=stop_after):
            if state.step == n:
                ck.stop_signal = 15
            return real(params, opt, sched, state, fp, total, interrupt=interrupt)
        ck.after_step = after_step
        with pytest.raises(TrainingInterrupted):
            train_cells(lm, examples, proto, [cells[j]], seed=4, out_dirs=[tmp_path / f"x{j}"], checkpointers=[ck],
                        **train_kw)
        cks.append(Checkpointer(tmp_path / f"ck{j}b", every_steps=2, resume_dir=ck.local_dir / f"step-{stop_after:08d}"))
    return cks


def test_a_cell_that_resumed_further_waits_for_the_group(lm64, tmp_path, force_plan):
    """Cells of one group may resume from different steps (one was interrupted later than another): each
    continues from its own step and ends equal to an uninterrupted run."""
    proto, examples = setup(lm64, **{"lora.dropout": 0.05, "train.checkpoint_every_steps": 2})
    cells = [Cell(1e-2, 2), Cell(3e-2, 2)]
    force_plan(2, 2)
    ref = train_cells(lm64, examples, proto, cells, seed=4, out_dirs=[tmp_path / "r0", tmp_path / "r1"])
    # cell 0 alone up to its checkpoint at step 2 (interrupted), cell 1 alone up to step 4
    cks = interrupted_alone(lm64, examples, proto, cells, (2, 4), tmp_path)
    recs = train_cells(lm64, examples, proto, cells, seed=4, out_dirs=[tmp_path / "o0", tmp_path / "o1"],
                       checkpointers=cks)
    assert [r["resumed_from_step"] for r in recs] == [2, 4]
    for j in range(2):
        a, b = adapter(tmp_path / f"o{j}"), adapter(tmp_path / f"r{j}")
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-12)
        assert [c["loss"] for c in recs[j]["loss_curve"]] == pytest.approx(
            [c["loss"] for c in ref[j]["loss_curve"]], abs=1e-5)


def test_group_refuses_bad_input(lm64, tmp_path):
    proto, examples = setup(lm64)
    with pytest.raises(ValueError, match="duplicate cells"):
        train_cells(lm64, examples, proto, [Cell(1e-2, 1), Cell(1e-2, 1)], 0, [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="one output directory per cell"):
        train_cells(lm64, examples, proto, [Cell(1e-2, 1)], 0, [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="no training examples"):
        train_cells(lm64, [], proto, [Cell(1e-2, 1)], 0, [tmp_path / "a"])
    for bad in (Cell(1e-2, 0), Cell(-1e-2, 1), Cell(float("nan"), 1)):
        with pytest.raises(ValueError, match=f"cell {re.escape(bad.key)}: expected a finite lr > 0"):
            train_cells(lm64, examples, proto, [bad], 0, [tmp_path / "a"])
    with pytest.raises(ValueError, match="share an output directory"):
        train_cells(lm64, examples, proto, [Cell(1e-2, 1), Cell(2e-2, 1)], 0, [tmp_path / "a", tmp_path / "a"])
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_gradient_checkpointing_gives_the_same_group(lm64, tmp_path, force_plan):
    proto, examples = setup(lm64, **{"lora.dropout": 0.05})
    gc, _ = setup(lm64, **{"lora.dropout": 0.05, "train.gradient_checkpointing": True})
    cells = [Cell(1e-2, 1), Cell(5e-2, 1)]
    force_plan(4, 2)
    a = train_cells(lm64, examples, proto, cells, 2, [tmp_path / "a0", tmp_path / "a1"])
    b = train_cells(lm64, examples, gc, cells, 2, [tmp_path / "b0", tmp_path / "b1"])
    assert not getattr(lm64.model, "is_gradient_checkpointing", False)
    for j in range(2):
        assert_same_cell(tmp_path / f"a{j}", tmp_path / f"b{j}", a[j], b[j])


def test_batch_plan_fills_the_budget_and_never_goes_below_one():
    assert batch_plan.plan(5, 16, 1000, 100, 100_000 * 80) == (16, 5)
    assert batch_plan.plan(25, 16, 1000, 100, 100_000 * 30) == (1, 25)
    assert batch_plan.plan(25, 16, 1000, 100, 100_000 * 7) == (1, 7)
    assert batch_plan.plan(1, 16, 1000, 100, 100_000 * 6) == (6, 1)
    assert batch_plan.plan(3, 16, 10**9, 10**4, 0) == (1, 1)


def test_saved_activation_bytes_grow_with_the_tokens(tiny_loaded):
    from zlt_dagster.core.lora_bank import LoraBank
    from zlt_dagster.core.packing import collate_packed, packed_attention
    from zlt_dagster.core.train import block_loss_sums

    proto, examples = setup(tiny_loaded, **{"lora.dropout": 0.05})
    short, long_ = sorted(examples, key=lambda e: len(e.input_ids))[0], max(examples, key=lambda e: len(e.input_ids))
    sizes = []
    with LoraBank(tiny_loaded.model, proto, 0, 1) as bank, packed_attention(tiny_loaded.model):
        tiny_loaded.model.train()
        for ex in (short, long_):
            b = collate_packed([ex], tiny_loaded.tokenizer.pad_token_id, "cpu")
            bank.set_batch([0])
            bank.set_masks(bank.drop_masks([1], [len(ex.input_ids)], "cpu"))
            sizes.append(batch_plan.saved_activation_bytes(lambda: block_loss_sums(tiny_loaded.model, b, 1)))
        tiny_loaded.model.eval()
    per_token = [s / len(e.input_ids) for s, e in zip(sizes, (short, long_))]
    assert sizes[1] > sizes[0] > 0
    assert per_token[1] == pytest.approx(per_token[0], rel=0.5)  # roughly linear in tokens


def test_auto_plan_is_recorded_and_respects_an_explicit_micro_batch(tiny_loaded, tmp_path):
    proto, examples = setup(tiny_loaded, **{"train.micro_batch": 0})
    rec = train_cells(tiny_loaded, examples, proto, [Cell(1e-2, 1), Cell(2e-2, 1)], 0,
                      [tmp_path / "a", tmp_path / "b"])[0]
    assert rec["batch_plan"]["source"] == "auto" and rec["batch_plan"]["activation_bytes_per_token"] > 0
    assert rec["micro_batch"] == 4 and rec["cells_per_forward"] == 2  # the tiny model fits: whole batch, both cells
    fixed, _ = setup(tiny_loaded, **{"train.micro_batch": 1})
    rec = train_cell(tiny_loaded, examples, fixed, Cell(1e-2, 1), 0, tmp_path / "c")
    assert (rec["micro_batch"], rec["batch_plan"]["source"]) == (1, "protocol")
    assert math.isfinite(rec["final_loss"])
    saved = json.loads((tmp_path / "c" / "train_run.json").read_text())
    assert saved["micro_batch"] == 1 and saved["group"]["cells"] == ["lr=0.01_ep=1"]


def test_over_a_bf16_base_the_adapter_trains_in_bf16_from_fp32_masters(tiny_loaded, tmp_path):
    """As under the seed's torch.autocast: bf16 matmuls, fp32 master weights that receive the gradients and are
    saved; the result stays close to peft's fp32 adapter path over the same bf16 base."""
    lm16 = dataclasses.replace(tiny_loaded, model=copy.deepcopy(tiny_loaded.model).to(torch.bfloat16),
                               dtype=torch.bfloat16)
    proto, examples = setup(tiny_loaded, **{"lora.dropout": 0.05})
    rec = train_cells(lm16, examples, proto, [Cell(2e-2, 2)], 0, [tmp_path / "bf16"])[0]
    ref = train_cells(lm16, examples, proto, [Cell(2e-2, 2)], 0, [tmp_path / "fp32"], lora_autocast=False)[0]
    assert (rec["lora_matmul"], ref["lora_matmul"]) == ("bf16 (autocast)", "fp32")
    a, b = adapter(tmp_path / "bf16"), adapter(tmp_path / "fp32")
    assert all(v.dtype == torch.float32 for v in a.values())
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in b if "lora_B" in k) ** 0.5
    den = sum(float(b[k].norm() ** 2) for k in b if "lora_B" in k) ** 0.5
    assert den > 1e-3 and num / den < 0.1, num / den
    assert rec["loss_curve"][0]["loss"] == pytest.approx(ref["loss_curve"][0]["loss"], rel=0.02)


def test_compiled_layers_compute_what_eager_computes(lm64, tmp_path, force_plan):
    """train_cells(compile_backend="inductor") (the default on CUDA) runs each decoder layer, LoRA bank inside,
    through inductor's generated code: the same adapters and curves as eager (float64; inductor's own summation
    order and Adam leave ~1e-5 in the weights, the curves agree to the 5 decimals recorded). Three cells of mixed
    epochs: forwards of two cells, of one of the three (a one-hot sum picks it: inductor's index_select got that
    case wrong), sets that change as cells finish. The graphs then serve the next pass of as many cells (other
    LRs and epochs) without compiling again, and the layers are eager again afterwards."""
    from torch._dynamo.utils import counters

    proto, examples = setup(lm64, **{"lora.dropout": 0.05, "train.micro_batch": 0})
    cells = [Cell(1e-2, 2), Cell(3e-2, 1), Cell(1e-3, 3)]
    force_plan(4, 2)
    eager = train_cells(lm64, examples, proto, cells, seed=3, out_dirs=[tmp_path / f"e{j}" for j in range(3)])
    torch._dynamo.reset()
    counters.clear()
    compiled = train_cells(lm64, examples, proto, cells, seed=3, out_dirs=[tmp_path / f"c{j}" for j in range(3)],
                           compile_backend="inductor")
    assert all(layer._compiled_call_impl is None for layer in lm64.model.model.layers)
    for j in range(3):
        a, b = adapter(tmp_path / f"c{j}"), adapter(tmp_path / f"e{j}")
        assert max(float(v.abs().max()) for key, v in b.items() if "lora_B" in key) > 1e-3  # it trained
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
        assert [c["loss"] for c in compiled[j]["loss_curve"]] == [c["loss"] for c in eager[j]["loss_curve"]]
        assert compiled[j]["compile"]["backend"] == "inductor" and compiled[j]["compile"]["compile_s"] > 0
        assert eager[j]["compile"] == {"backend": None, "compile_s": 0.0}
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # forwards of one cell and of two: all layers share them
    other = [Cell(2e-2, 1), Cell(5e-3, 3), Cell(4e-2, 2)]
    train_cells(lm64, examples, proto, other, seed=3, out_dirs=[tmp_path / f"o{j}" for j in range(3)],
                compile_backend="inductor")
    assert counters["stats"]["unique_graphs"] == graphs
    # three cells per forward, then two, then one as they finish: the multi-cell graph takes any number of
    # cells (it recompiled at every step down when the count was a Python int: 25 -> 20 -> ... in the paper pass)
    force_plan(4, 3)
    train_cells(lm64, examples, proto, [Cell(2e-2, 3), Cell(5e-3, 2), Cell(4e-2, 1)], seed=3,
                out_dirs=[tmp_path / f"t{j}" for j in range(3)], compile_backend="inductor")
    assert counters["stats"]["unique_graphs"] == graphs


def test_training_budget_counts_memory_torch_caches_unused(monkeypatch):
    """After a pass (or generation) in the same process torch's allocator keeps its blocks; the driver reports them
    as taken. The training budget counts them as free (a pass after a 64 GiB one was planned at micro-batch 1)."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (10 * gib, 100 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 70 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 5 * gib)
    budget = batch_plan.memory_budget(torch.device("cuda"), persistent_bytes=gib)
    assert budget == int((10 + 65) * gib - batch_plan.CUDA_RESERVE_FRACTION * 100 * gib - gib)
