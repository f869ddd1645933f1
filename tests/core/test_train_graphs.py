"""CUDA graphs of the training step (core/train_graphs.py), on the CPU: static shapes change nothing (float64), the
emulated graphs (the same static-input protocol as CUDA graphs, without CUDA) train exactly what plain forwards
train, a failed capture or check turns graphs off with its reason and without training a micro-batch twice, and the
graphed forward + backward reads nothing back to the host (a capture would refuse it)."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from tests.core.test_train_group import adapter, lm64, setup  # noqa: F401  (lm64: a fixture)
from zlt_dagster import settings
from zlt_dagster.core import packing, train_graphs
from zlt_dagster.core.lora_bank import LoraBank, example_key
from zlt_dagster.core.masking import IGNORE
from zlt_dagster.core.packing import StaticShape, collate_packed, packed_attention
from zlt_dagster.core.protocol import Cell, get_protocol
from zlt_dagster.core.train import block_loss_sums, train_cells
from zlt_dagster.core.train_graphs import MicroBatches, bucket_tokens, graphs_reason


def examples(lengths, vocab=200, supervised=3):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        out.append(SimpleNamespace(input_ids=ids, labels=[IGNORE] * (n - supervised) + ids[-supervised:]))
    return out


# --- shapes ----------------------------------------------------------------------------------------------------
def test_bucket_tokens_pads_less_than_a_sixteenth_and_refuses_nothing_to_pack():
    for n in list(range(1, 3000)) + [5_900, 11_000, 79_257]:
        b = bucket_tokens(n)
        assert b >= n and b % 128 == 0 and (b - n < 128 or (b - n) * 16 < n), n
    assert len({bucket_tokens(n) for n in range(4_500, 7_400)}) <= 13  # a one-cell paper pass: ~12 shapes
    with pytest.raises(ValueError, match="n=0"):
        bucket_tokens(0)


def test_static_shape_pads_in_segments_of_their_own_and_empty_segments():
    exs = examples([5, 3])
    b = collate_packed(exs, 0, "cpu", shape=StaticShape(tokens=16, supervised=8, segments=6, width=5),
                       step_supervised=11)
    assert b.tokens == 16 and b.real_tokens == 8
    # the examples, 8 padding tokens in segments of <= 5 (the width), then an empty segment
    assert b.cu_seqlens.tolist() == [0, 5, 8, 13, 16, 16, 16]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2] + [0, 1, 2, 3, 4, 0, 1, 2]
    assert b.grid.shape == (6, 5, 0) and b.dest.tolist()[8:] == [10, 11, 12, 13, 14, 15, 16, 17]
    # position t predicts labels[t + 1]; the first label of each example is never supervised
    assert b.sup_pos.tolist() == [1, 2, 3, 5, 6, 0, 0, 0]  # 2nd example: only 2 of its 3 (its first is not)
    assert b.sup_target.tolist()[:5] == exs[0].input_ids[2:] + exs[1].input_ids[1:]
    assert b.sup_target.tolist()[5:] == [IGNORE] * 3 and b.step_supervised.tolist() == [11]
    with pytest.raises(ValueError, match="do not fit the static shape"):
        collate_packed(examples([5, 3]), 0, "cpu", shape=StaticShape(tokens=7, supervised=8, segments=6, width=5))
    with pytest.raises(ValueError, match="do not fit the static shape"):  # too few segments for the padding
        collate_packed(examples([5, 3]), 0, "cpu", shape=StaticShape(tokens=30, supervised=8, segments=4, width=5))
    with pytest.raises(ValueError, match="supervised positions do not fit"):
        collate_packed(examples([5, 3]), 0, "cpu", shape=StaticShape(tokens=16, supervised=4, segments=6, width=5))


def test_static_shape_gives_the_exact_loss_and_gradients(lm64):
    """Padding tokens in segments of their own, empty segments and padded supervised slots: the same loss sums and
    the same gradient of every weight as the plain packed batch, float64 (the grid attention path)."""
    model = copy.deepcopy(lm64.model).requires_grad_(True)
    model.train()
    exs = examples([9, 14, 6], vocab=model.config.vocab_size)
    results = []
    for shape in (None, StaticShape(tokens=64, supervised=32, segments=12, width=16)):
        batch = collate_packed(exs, lm64.tokenizer.pad_token_id, "cpu", shape=shape)
        model.zero_grad(set_to_none=True)
        with packed_attention(model):
            loss = block_loss_sums(model, batch, 1)
        loss.sum().backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-10, atol=1e-14, msg=name)


def test_drop_masks_into_a_buffer_equal_fresh_ones_and_clear_its_padding(lm64):
    proto = get_protocol("tiny", {"lora.dropout": 0.3})
    with LoraBank(lm64.model, proto, 0, 1) as bank:
        keys, lengths = [example_key(0, 1, i) for i in range(3)], [4, 7, 2]
        fresh = bank.drop_masks(keys, lengths, "cpu", 16)
        buf = torch.ones((16, bank.total_in), dtype=torch.bool)  # stale contents: the padding rows must be cleared
        assert bank.drop_masks(keys, lengths, "cpu", 16, out=buf) is buf
        assert torch.equal(buf, fresh) and not buf[13:].any() and buf[:13].any()
        with pytest.raises(ValueError, match="expected bool"):
            bank.drop_masks(keys, lengths, "cpu", 16, out=torch.zeros((15, bank.total_in), dtype=torch.bool))


# --- the emulated graphs train what plain forwards train -----------------------------------------------------------
# A static shape pads the packed row: the matmuls then sum the same float64 products in other blocks (one step's
# gradients agree to 1e-10, test above), which Adam's first steps amplify on elements near 0: measured up to 1.5e-6
# relative, 7e-10 absolute against a tensor's largest element of ~1e-2; a wrong gradient shows at 1e-3 and above
def assert_same_cell_padded(a_dir, b_dir, rec_a, rec_b):
    a, b = adapter(a_dir), adapter(b_dir)
    assert set(a) == set(b) and max(float(v.abs().max()) for key, v in b.items() if "lora_B" in key) > 1e-4
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6 * float(b[key].abs().max()), msg=key)
    assert [c["loss"] for c in rec_a["loss_curve"]] == pytest.approx([c["loss"] for c in rec_b["loss_curve"]],
                                                                      rel=1e-8, abs=1e-5)
    for key in ("steps", "tokens", "supervised_tokens", "steps_per_epoch", "warmup_steps"):
        assert rec_a[key] == rec_b[key], key
def graphs_vs_plain(lm, tmp_path, cells, n=10, compile_backend=None, **overrides):
    proto, exs = setup(lm, n=n, **overrides)
    plain = train_cells(lm, exs, proto, cells, seed=5, out_dirs=[tmp_path / f"p{j}" for j in range(len(cells))],
                        cuda_graphs=False)
    graphed = train_cells(lm, exs, proto, cells, seed=5, out_dirs=[tmp_path / f"g{j}" for j in range(len(cells))],
                          cuda_graphs=True, compile_backend=compile_backend)
    return plain, graphed


@pytest.mark.parametrize("dropout,backend", [(0.0, None), (0.1, None), (0.1, "aot_eager")])
def test_emulated_graphs_train_what_plain_forwards_train(lm64, tmp_path, dropout, backend):
    """Cells that finish at different epochs (the set of cells changes: new graphs, captured without an eager run),
    dropout on and off, layers eager or compiled (aot_eager: dynamo + AOTAutograd, as on the GPU but without
    generated kernels): adapters and loss curves equal the plain eager pass, float64; graphs were captured once per
    shape and set of cells and replayed for the rest."""
    cells = [Cell(3e-2, 3), Cell(1e-2, 1), Cell(2e-2, 3)]
    plain, graphed = graphs_vs_plain(lm64, tmp_path, cells, compile_backend=backend,
                                     **{"lora.dropout": dropout, "train.micro_batch": 2})
    for j in range(len(cells)):
        assert_same_cell_padded(tmp_path / f"g{j}", tmp_path / f"p{j}", graphed[j], plain[j])
    stats = max(graphed, key=lambda r: r["steps"])["cuda_graphs"]
    assert stats["used"] and stats["reason"] is None
    assert stats["captured"] >= 2 and stats["replays"] > stats["captured"]  # two sets of cells, shapes reused
    assert stats["eager_runs"] == 3  # the pass's first graph, and the eager runs of checks (2) and (3)
    assert [c.split(" (")[0] for c in stats["checks"]] == ["first capture", "new inputs", "adapters trained"]
    assert all(c.endswith("): ok") for c in stats["checks"])
    assert stats["token_slots"] >= stats["tokens"] > 0
    off = plain[0]["cuda_graphs"]
    assert not off["used"] and off["reason"] == "cuda_graphs=False" and off["captured"] == 0


def test_emulated_graphs_with_packed_micro_batches_of_many_sizes(lm64, tmp_path):
    """The pipeline's automatic split (packed micro-batches capped by tokens: their sizes vary step to step):
    several static shapes, reused within GRAPH_REUSE_SLACK; the same cells as plain forwards."""
    proto, exs = setup(lm64, n=12, **{"lora.dropout": 0.05, "train.micro_batch": 0})
    lengths = sorted(len(e.input_ids) for e in exs)
    from zlt_dagster.core import batch_plan

    cells = [Cell(1e-2, 2), Cell(3e-2, 2)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch_plan, "tokens_per_forward", lambda bpt, budget, c: 3 * lengths[len(lengths) // 2])
        plain = train_cells(lm64, exs, proto, cells, seed=2, out_dirs=[tmp_path / f"p{j}" for j in range(2)],
                            cuda_graphs=False)
        graphed = train_cells(lm64, exs, proto, cells, seed=2, out_dirs=[tmp_path / f"g{j}" for j in range(2)],
                              cuda_graphs=True)
    for j in range(2):
        assert_same_cell_padded(tmp_path / f"g{j}", tmp_path / f"p{j}", graphed[j], plain[j])
    stats = graphed[0]["cuda_graphs"]
    assert stats["used"] and stats["shapes"] >= 2 and stats["replays"] > 0
    assert graphed[0]["micro_batches"] == plain[0]["micro_batches"]


def test_one_cell_left_after_several_stops_graphs_instead_of_an_eager_run_beside_them(lm64, tmp_path):
    """torch.compile specialises a forward of one cell: the first such forward after graphs of several would run
    eagerly beside the graphs' memory pool; graphs stop for the pass instead (recorded), the cells are unchanged."""
    cells = [Cell(3e-2, 2), Cell(1e-2, 1)]
    plain, graphed = graphs_vs_plain(lm64, tmp_path, cells, **{"lora.dropout": 0.1, "train.micro_batch": 2})
    for j in range(2):
        assert_same_cell_padded(tmp_path / f"g{j}", tmp_path / f"p{j}", graphed[j], plain[j])
    stats = graphed[0]["cuda_graphs"]
    assert not stats["used"] and stats["captured"] >= 1 and stats["replays"] >= 1
    assert stats["reason"] == ("a forward of 1 cell(s) after forwards of several would run eagerly beside the "
                               "graphs' memory")


def test_a_failed_capture_turns_graphs_off_and_trains_each_micro_batch_once(lm64, tmp_path, monkeypatch):
    calls = []

    class Refused(train_graphs._EmulatedGraph):
        def __init__(self, body, pool):
            calls.append(1)
            if len(calls) == 2:  # the second capture (a later shape): after one graph already served
                raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
            super().__init__(body, pool)

    monkeypatch.setattr(train_graphs, "_EmulatedGraph", Refused)
    said = []
    cells = [Cell(3e-2, 2), Cell(1e-2, 1)]
    proto, exs = setup(lm64, n=10, **{"lora.dropout": 0.1, "train.micro_batch": 1})
    plain = train_cells(lm64, exs, proto, cells, seed=5, out_dirs=[tmp_path / f"p{j}" for j in range(2)],
                        cuda_graphs=False)
    graphed = train_cells(lm64, exs, proto, cells, seed=5, out_dirs=[tmp_path / f"g{j}" for j in range(2)],
                          cuda_graphs=True, progress=said.append)
    for j in range(2):
        assert_same_cell_padded(tmp_path / f"g{j}", tmp_path / f"p{j}", graphed[j], plain[j])
    stats = graphed[0]["cuda_graphs"]
    assert not stats["used"] and stats["reason"].startswith("capture failed at ")
    assert "RuntimeError: operation not permitted when stream is capturing ... more detail" in stats["reason"]
    assert any(m.startswith("CUDA graphs off for the rest of this pass: capture failed") for m in said)


def test_a_replay_that_disagrees_with_the_eager_run_turns_graphs_off(lm64, tmp_path, monkeypatch):
    """The first capture's check: a graph whose replay computes something else (here: it adds the gradient
    twice, as a capture that kept a stale input might) is refused; the pass equals the plain one."""
    class Doubling(train_graphs._EmulatedGraph):
        def replay(self):
            self.body()
            return super().replay()

    monkeypatch.setattr(train_graphs, "_EmulatedGraph", Doubling)
    cells = [Cell(3e-2, 2)]
    plain, graphed = graphs_vs_plain(lm64, tmp_path, cells, **{"lora.dropout": 0.1, "train.micro_batch": 2})
    assert_same_cell_padded(tmp_path / "g0", tmp_path / "p0", graphed[0], plain[0])
    stats = graphed[0]["cuda_graphs"]
    assert not stats["used"] and stats["reason"].startswith("check (first capture) failed") and "off of" in stats["reason"]


def test_out_of_memory_in_a_capture_is_raised(lm64, tmp_path, monkeypatch):
    class Oom(train_graphs._EmulatedGraph):
        def __init__(self, body, pool):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_graphs, "_EmulatedGraph", Oom)
    proto, exs = setup(lm64, n=6)
    with pytest.raises(torch.OutOfMemoryError):
        train_cells(lm64, exs, proto, [Cell(1e-2, 1)], seed=1, out_dirs=[tmp_path / "o"], cuda_graphs=True)


def test_the_graphed_step_reads_nothing_back_to_the_host(lm64, tmp_path, monkeypatch):
    """A CUDA graph cannot hold a host read (a capture refuses it; `nonzero` was one, in the loss): every replayed
    forward + backward runs with nonzero, masked_select, unique, item, tolist and bool / int / float conversion of
    tensors refused. (Boolean-mask indexing syncs inside C++ and is not seen here; the CUDA capture refuses it.
    Only the CPU grid attention path runs here; the varlen path ran captured on the H200, BENCHMARKS.md.)"""
    refused = [(torch.Tensor, name) for name in ("nonzero", "item", "tolist", "__bool__", "__int__", "__float__",
                                                 "cpu", "numpy")]
    refused += [(torch, name) for name in ("nonzero", "masked_select", "unique", "argwhere")]
    real = {(owner, name): getattr(owner, name) for owner, name in refused}
    real_body = MicroBatches._forward_backward
    inside = []

    def guarded(self, batch, cells):
        inside.append(1)
        for owner, name in refused:
            monkeypatch.setattr(owner, name, lambda *a, n=name, **k: (_ for _ in ()).throw(
                AssertionError(f"host read inside the graphed step: {n}")))
        try:
            return real_body(self, batch, cells)
        finally:
            for (owner, name), fn in real.items():
                monkeypatch.setattr(owner, name, fn)

    monkeypatch.setattr(MicroBatches, "_forward_backward", guarded)
    proto, exs = setup(lm64, n=8, **{"lora.dropout": 0.1, "train.micro_batch": 2})
    rec = train_cells(lm64, exs, proto, [Cell(1e-2, 2), Cell(2e-2, 2)], seed=1,
                      out_dirs=[tmp_path / "a", tmp_path / "b"], cuda_graphs=True)[0]
    assert inside and rec["cuda_graphs"]["used"] and rec["cuda_graphs"]["replays"] > 0


def test_graphs_reason_and_the_setting(monkeypatch, lm64):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert graphs_reason(cpu, lm64.model, False, "auto") == "device cpu"
    assert graphs_reason(cuda, lm64.model, False, "off") == "ZLT_TRAIN_CUDA_GRAPHS=off"
    assert graphs_reason(cuda, lm64.model, True, "auto") == "gradient checkpointing"
    assert graphs_reason(cuda, lm64.model, False, "auto") is None
    monkeypatch.setattr(train_graphs, "parameter_count", lambda m: 7_000_000_000)
    assert "GPU-bound" in graphs_reason(cuda, lm64.model, False, "auto")
    monkeypatch.setenv("ZLT_TRAIN_CUDA_GRAPHS", "Off")
    assert settings.train_cuda_graphs() == "off"
    monkeypatch.setenv("ZLT_TRAIN_CUDA_GRAPHS", "on")
    with pytest.raises(settings.SettingsError, match="^ZLT_TRAIN_CUDA_GRAPHS: 'on'; expected auto or off$"):
        settings.validate()


def test_the_pipeline_default_on_the_cpu_is_plain_and_says_why(lm64, tmp_path):
    proto, exs = setup(lm64, n=6)
    said = []
    rec = train_cells(lm64, exs, proto, [Cell(1e-2, 1)], seed=1, out_dirs=[tmp_path / "d"], progress=said.append)[0]
    assert rec["cuda_graphs"]["reason"] == "device cpu" and not rec["cuda_graphs"]["used"]
    assert "CUDA graphs: off (device cpu)" in said
    assert math.isfinite(rec["final_loss"]) and adapter(tmp_path / "d")
