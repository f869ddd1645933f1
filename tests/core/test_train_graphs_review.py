"""A review's attempts to break the CUDA-graph training step (core/train_graphs.py), on the CPU with emulated graphs
(float64). The tests once marked DEFECT failed on 9f8c6f8 and pass since the fixes: each docstring says what it
showed."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tests.core.test_train_graphs import examples, graphs_vs_plain, lm64  # noqa: F401  (lm64: a fixture)
from tests.core.test_train_group import adapter, interrupted_alone, setup
from zlt_dagster.core import batch_plan, train_graphs
from zlt_dagster.core.lora_bank import LoraBank
from zlt_dagster.core.masking import IGNORE
from zlt_dagster.core.packing import PackedBatch, StaticShape, collate_packed
from zlt_dagster.core.protocol import Cell, get_protocol
from zlt_dagster.core.train import block_loss_sums, train_cells
from zlt_dagster.core.train_graphs import MicroBatches


def same_cells(tmp_path, a_prefix, b_prefix, n):
    """True when every adapter tensor of a_prefix{j} equals b_prefix{j} to the tolerance of
    test_train_graphs.assert_same_cell_padded (padding changes float64 summation order only)."""
    for j in range(n):
        a, b = adapter(tmp_path / f"{a_prefix}{j}"), adapter(tmp_path / f"{b_prefix}{j}")
        for key in b:
            if not torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6 * float(b[key].abs().max())):
                return False
    return True


# --- things that held ------------------------------------------------------------------------------------------
def test_full_logits_with_graphs_trains_what_plain_forwards_train(lm64, tmp_path):
    """full_logits=True reads labels (padding: IGNORE) instead of sup_pos: same cells as plain forwards."""
    proto, exs = setup(lm64, n=8, **{"lora.dropout": 0.1, "train.micro_batch": 2})
    cells = [Cell(3e-2, 2), Cell(1e-2, 1)]
    plain = train_cells(lm64, exs, proto, cells, seed=5, out_dirs=[tmp_path / f"p{j}" for j in range(2)],
                        full_logits=True, cuda_graphs=False)
    graphed = train_cells(lm64, exs, proto, cells, seed=5, out_dirs=[tmp_path / f"g{j}" for j in range(2)],
                          full_logits=True, cuda_graphs=True)
    assert same_cells(tmp_path, "g", "p", 2)
    assert graphed[0]["cuda_graphs"]["captured"] >= 1 and graphed[0]["loss_path"] == "full_logits"
    assert [c["loss"] for c in graphed[0]["loss_curve"]] == pytest.approx(
        [c["loss"] for c in plain[0]["loss_curve"]], rel=1e-8, abs=1e-5)


def test_resume_at_different_steps_with_graphs_equals_an_uninterrupted_run(lm64, tmp_path, monkeypatch):
    """Cells resumed from different steps: the pass starts with ONE cell (graphs of one cell), then the set grows
    to two, which stops graphs (the eager run beside the pool rule); the cells still equal an uninterrupted plain
    pass."""
    proto, exs = setup(lm64, **{"lora.dropout": 0.05, "train.checkpoint_every_steps": 2})
    monkeypatch.setattr(batch_plan, "plan", lambda n, eff, bpt, longest, budget, micro=0: (micro or min(2, eff),
                                                                                          min(2, n)))
    monkeypatch.setattr(batch_plan, "tokens_per_forward", lambda bpt, budget, cells: 0)
    cells = [Cell(1e-2, 2), Cell(3e-2, 2)]
    train_cells(lm64, exs, proto, cells, seed=4, out_dirs=[tmp_path / "r0", tmp_path / "r1"], cuda_graphs=False)
    cks = interrupted_alone(lm64, exs, proto, cells, (2, 4), tmp_path, cuda_graphs=True)
    recs = train_cells(lm64, exs, proto, cells, seed=4, out_dirs=[tmp_path / "o0", tmp_path / "o1"],
                       checkpointers=cks, cuda_graphs=True)
    assert [r["resumed_from_step"] for r in recs] == [2, 4]
    assert same_cells(tmp_path, "o", "r", 2)
    stats = recs[0]["cuda_graphs"]
    assert stats["captured"] >= 1 and not stats["used"]
    assert stats["reason"].startswith("a forward of 2 cell(s) after forwards of one cell")


# --- once defects, fixed ---------------------------------------------------------------------------------------------------
def test_load_refuses_a_batch_of_another_static_shape():
    """Was a defect: PackedBatch.load_ promises ValueError on another shape, but compares only the length of `flat`
    (4T + 2S + 1), cu_seqlens and grid: StaticShape(256 tokens, 64 supervised) and (128, 320) have the same flat
    length, so a batch of one is copied into the other's tensors and its fields are read at the wrong offsets."""
    a = collate_packed(examples([100, 50]), 0, "cpu", shape=StaticShape(256, 64, 8, 128))
    b = collate_packed(examples([100, 20]), 0, "cpu", shape=StaticShape(128, 320, 8, 128))
    assert a.flat.shape == b.flat.shape and a.tokens != b.tokens
    with pytest.raises(ValueError, match="one static shape"):
        a.load_(b)


def test_a_failed_capture_records_its_cause_not_capture_end(monkeypatch):
    """Was a defect: _CudaGraph calls capture_end() in `finally`; when the body's error invalidated the capture (a host
    sync, an illegal op), capture_end raises too (cudaErrorStreamCaptureInvalidated) and that error replaces the
    body's: the run record's `cuda_graphs.reason` then says 'operation failed due to a previous error during
    capture' instead of what failed. (A fake CUDAGraph here; torch's capture_end does raise on an invalidated
    capture.)"""
    class FakeGraph:
        def capture_begin(self, pool=None, capture_error_mode="global"):
            pass

        def capture_end(self):
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)

    def body():
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing (aten::nonzero)")

    with pytest.raises(RuntimeError) as err:
        train_graphs._CudaGraph(body, None)
    assert "not permitted when stream is capturing" in str(err.value)


def _record_runner(monkeypatch):
    owner = []
    real_init = MicroBatches.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        owner.append(self)
    monkeypatch.setattr(MicroBatches, "__init__", init)
    return owner


def test_the_first_capture_check_sees_the_lora_A_gradient(lm64, tmp_path, monkeypatch):
    """Was a defect: the first capture is checked at the pass's first micro-batch, where every cell is at peft's init
    (lora_B = 0): the loss equals the base model's whatever the adapters do, and every lora_A gradient is exactly 0.
    A graph whose replay never adds the lora_A gradients (half the backward missing) passes the check, stays on
    for the pass, and lora_A never trains. The check should replay on inputs where A's path is live (e.g. after
    the first optimizer step, or a later micro-batch against an eager run) or compare per tensor."""
    owner = _record_runner(monkeypatch)

    class DropsLoraAGrad(train_graphs._EmulatedGraph):
        def replay(self):
            bank = owner[-1].bank
            before = bank.grads.clone()
            out = super().replay()
            for name, off, shape in bank.layout:
                if name.endswith("lora_A"):
                    n = math.prod(shape)
                    bank.grads[:, off:off + n] = before[:, off:off + n]
            return out

    monkeypatch.setattr(train_graphs, "_EmulatedGraph", DropsLoraAGrad)
    _, graphed = graphs_vs_plain(lm64, tmp_path, [Cell(3e-2, 2)], n=8, **{"lora.dropout": 0.1, "train.micro_batch": 2})
    stats = graphed[0]["cuda_graphs"]
    assert not stats["used"] and stats["reason"].startswith("check (adapters trained) failed") \
        and "LoRA A gradient" in stats["reason"], stats
    assert same_cells(tmp_path, "g", "p", 1)  # the check's eager run was the micro-batch's work


def test_the_first_capture_check_sees_a_graph_that_reads_stale_inputs(lm64, tmp_path, monkeypatch):
    """Was a defect (docstring claim): 'replayed on the same inputs ... (a capture that missed an input would differ)'.
    A graph that missed an input (on CUDA: a tensor replaced instead of filled in place, the graph keeps reading
    the old one) gives the right answer exactly when replayed on the inputs it was captured with, which is what
    the check does. Emulated here by a graph that keeps the batch of its first replay."""
    class Stale(train_graphs._EmulatedGraph):
        def __init__(self, body, pool):
            super().__init__(body, pool)
            self.static = next(c.cell_contents for c in body.__closure__
                               if isinstance(c.cell_contents, PackedBatch))
            self.kept = None

        def replay(self):
            if self.kept is None:
                self.kept = (self.static.flat.clone(), self.static.cu_seqlens.clone())
            else:
                self.static.flat.copy_(self.kept[0])
                self.static.cu_seqlens.copy_(self.kept[1])
            return super().replay()

    monkeypatch.setattr(train_graphs, "_EmulatedGraph", Stale)
    _, graphed = graphs_vs_plain(lm64, tmp_path, [Cell(3e-2, 2)], n=8, **{"lora.dropout": 0.1, "train.micro_batch": 2})
    stats = graphed[0]["cuda_graphs"]
    assert not stats["used"] and stats["reason"].startswith("check (new inputs) failed"), stats
    assert same_cells(tmp_path, "g", "p", 1)


def test_a_static_shape_stays_within_the_plans_token_cap(lm64):
    """Was a defect (memory plan): batch_plan.tokens_per_forward is the memory bound of a packed forward, but the
    static shape pads a micro-batch at the cap beyond it (bucket: up to 1/16 or 127 tokens; reuse: up to 1/8),
    and the runner only knows the one-cell cap. Activations (and the persistent mask buffer, token_slots x
    total_in bools, allocated after the plan read free memory) are not in the budget."""
    proto = get_protocol("tiny", {"lora.dropout": 0.1})
    with LoraBank(lm64.model, proto, 0, 1) as bank:
        mb = MicroBatches(lm64.model, bank, 0, torch.device("cpu"), loss_sums=block_loss_sums, full_logits=False,
                          multiple=1, graphs=True, lengths=[500] * 16, effective_batch=16)
        shape = mb._shape_for(1000, 10, cap=1000)
        assert shape.tokens <= 1000, f"a micro-batch of 1000 tokens (the cap) runs {shape.tokens} token slots"


def test_static_shapes_fit_every_micro_batch_train_cells_can_cut():
    """Property check (held): for random lengths, effective batches, token caps (<= the one-cell cap, as for more
    cells), multiples 1 and 8 and shape reuse, _shape_for never raises and collate_packed always fits the shape
    (segments, width, supervised slots)."""
    from zlt_dagster.core.train import micro_batches

    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 40, (1,), generator=g))
        top = int(torch.randint(2, 1200, (1,), generator=g))
        lengths = torch.randint(1, top + 1, (n,), generator=g).tolist()
        eff = int(torch.randint(1, 20, (1,), generator=g))
        cap1 = int(torch.randint(0, 3 * top, (1,), generator=g))
        multiple = [1, 8][trial % 2]
        exs = examples(lengths, supervised=1)
        bank = SimpleNamespace(dropout=0.0)
        mb = MicroBatches(None, bank, 0, torch.device("cpu"), loss_sums=None, full_logits=False, multiple=multiple,
                          graphs=True, lengths=lengths, effective_batch=eff)
        order = torch.randperm(n, generator=g).tolist()
        for s in range(0, n, eff):
            idx = order[s:s + eff]
            cap = 0 if cap1 == 0 else max(1, cap1 // int(torch.randint(1, 6, (1,), generator=g)))
            micro = int(torch.randint(1, eff + 1, (1,), generator=g))
            for cut in micro_batches(idx, micro, length=lambda i: lengths[i], max_tokens=cap):
                part = [exs[i] for i in cut]
                sup = sum(1 for e in part for y in e.labels[1:] if y != IGNORE)
                shape = mb._shape_for(sum(lengths[i] for i in cut), sup, cap)
                assert not cap or shape.tokens <= max(cap, sum(lengths[i] for i in cut))
                collate_packed(part, 0, "cpu", shape=shape)
                mb._statics.setdefault(shape, None)
