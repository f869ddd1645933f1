"""Resumable training (issue 9): kill a training cell mid-run (SIGKILL, like an OOM-killed or force-deleted pod;
SIGTERM, like an evicted one), rerun it, and get the adapter an uninterrupted run with the same seed produces.

The cell runs in its own process (tests/reliability/train_cell_proc.py, tiny model on CPU, one thread, every
forward pass slowed down so the test can hit it mid-run); the rerun and the uninterrupted reference run in-process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zlt_dagster import steps
from zlt_dagster.steps import layout
from zlt_dagster.core import checkpoint as ck
from zlt_dagster.steps.checkpoints import StoreCheckpoints
from zlt_dagster.core.protocol import Cell, Sweep, get_protocol
from zlt_dagster.storage import LocalStore

from reliability_helpers import report

CELL = Cell(1e-2, 5)
PROC = Path(__file__).with_name("train_cell_proc.py")
COMPUTE = steps.ComputeSettings(device="cpu", torch_threads=1, lease_ttl_s=3)
QUIET = lambda _m: None  # noqa: E731


def _sweep(every: int) -> Sweep:
    return Sweep(get_protocol("tiny", {"train": {"checkpoint_every_steps": every}}), base_model="tiny").validate()


def _adapter_tensors(store, sweep, cell, dest: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    store.fetch_artifact(layout.cell_prefix(sweep.sweep_id, cell, "adapter"), dest)
    return load_file(str(dest / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two registered tiny sweeps (periodic checkpoints every 2 steps / only on SIGTERM), their on-policy data and
    the adapter of one uninterrupted run of CELL each (then deleted from the store, kept in memory)."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("resume")
    store = LocalStore(root / "store")
    store.lock_ttl_s = 3
    out = {"root": root, "store": store, "sweeps": {}, "ref": {}, "ref_record": {}}
    try:
        for name, every in (("periodic", 2), ("sigterm_only", 0)):
            sweep = _sweep(every)
            steps.register_sweep(store, sweep)
            steps.run_onpolicy(store, sweep, COMPUTE, log=QUIET)
            t0 = time.perf_counter()
            rec = steps.run_adapter(store, sweep, CELL, COMPUTE, log=QUIET)
            out["ref_record"][name] = rec | {"test_wall_s": time.perf_counter() - t0}
            out["ref"][name] = _adapter_tensors(store, sweep, CELL, root / f"ref-{name}")
            store.delete_prefix(layout.cell_prefix(sweep.sweep_id, CELL, "adapter"))
            out["sweeps"][name] = sweep
        yield out
    finally:
        torch.set_num_threads(threads)


def _spawn(env, sweep, ticks: Path, delay: float) -> subprocess.Popen:
    cmd = [sys.executable, str(PROC), str(env["store"].root), sweep.sweep_id, repr(CELL.lr), str(CELL.epochs),
           "--delay", str(delay), "--ticks", str(ticks), "--lease-ttl", "3"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait(pred, timeout: float, proc: subprocess.Popen, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"trainer exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}:\n{proc.stdout.read()}")


def _assert_same_adapter(got: dict, ref: dict) -> float:
    assert set(got) == set(ref)
    worst = 0.0
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-6), f"{k} differs from the uninterrupted run"
        worst = max(worst, float((got[k] - ref[k]).abs().max()))
    return worst


def test_sigkill_mid_run_then_rerun_resumes_to_the_same_adapter(env, tmp_path):
    store, sweep = env["store"], env["sweeps"]["periodic"]
    steps_total = env["ref_record"]["periodic"]["steps"]
    ckpts = StoreCheckpoints(store, layout.checkpoint_prefix(sweep.sweep_id, CELL))
    proc = _spawn(env, sweep, tmp_path / "ticks", delay=0.25)
    t0 = time.monotonic()
    # kill once a checkpoint past the first third of the run is committed
    _wait(lambda: any(s >= steps_total // 3 for s in ckpts.committed_steps()), 180, proc, "a checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    killed_after = time.monotonic() - t0
    assert proc.returncode == -signal.SIGKILL
    assert not store.artifact_exists(layout.cell_prefix(sweep.sweep_id, CELL, "adapter"))
    last = max(ckpts.committed_steps())
    assert 0 < last < steps_total

    t1 = time.monotonic()
    rec = steps.run_adapter(store, sweep, CELL, COMPUTE, log=QUIET)
    rerun_s = time.monotonic() - t1
    assert rec["resumed_from_step"] == last
    assert rec["steps"] == steps_total and rec["segments"] == 2
    stored = json.loads(store.read_artifact_file(layout.cell_prefix(sweep.sweep_id, CELL, "adapter"),
                                                 "train_run.json"))
    assert stored["resumed_from_step"] == last
    # the loss curve is the uninterrupted run's, step for step
    ref_curve = env["ref_record"]["periodic"]["first_loss"], env["ref_record"]["periodic"]["final_loss"]
    assert (stored["first_loss"], stored["final_loss"]) == pytest.approx(ref_curve, abs=1e-4)
    worst = _assert_same_adapter(_adapter_tensors(store, sweep, CELL, tmp_path / "got"), env["ref"]["periodic"])
    # checkpoints and leases are gone once the adapter is committed
    assert store.list_keys(layout.checkpoint_prefix(sweep.sweep_id, CELL)) == []
    assert not store.exists(layout.training_lock_key(sweep.sweep_id, CELL))
    report("sigkill_resume", steps=steps_total, killed_at_checkpoint=last, killed_after_s=round(killed_after, 1),
            rerun_s=round(rerun_s, 1), max_abs_diff=worst)


def test_sigterm_writes_a_checkpoint_then_exits_and_the_rerun_resumes_from_it(env, tmp_path):
    """checkpoint_every_steps=0: the only checkpoint there can be is the one written on SIGTERM."""
    store, sweep = env["store"], env["sweeps"]["sigterm_only"]
    steps_total = env["ref_record"]["sigterm_only"]["steps"]
    ckpts = StoreCheckpoints(store, layout.checkpoint_prefix(sweep.sweep_id, CELL))
    ticks = tmp_path / "ticks"
    proc = _spawn(env, sweep, ticks, delay=0.25)
    # 2 forward passes (micro-batches) per step: wait until step 3 is running
    _wait(lambda: ticks.exists() and ticks.stat().st_size >= 5, 180, proc, "step 3")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    exit_s = time.monotonic() - t0
    assert proc.returncode == 143, output
    assert "SIGTERM received" in output and "INTERRUPTED" in output
    committed = ckpts.committed_steps()
    assert len(committed) == 1 and 0 < committed[0] < steps_total, output
    state = json.loads(store.read_artifact_file(f"{ckpts.prefix}/{ck.step_dir_name(committed[0])}", ck.STATE_FILE))
    assert state["reason"] == "sigterm" and state["step"] == committed[0]
    assert f"INTERRUPTED step={committed[0]} " in output
    assert not store.artifact_exists(layout.cell_prefix(sweep.sweep_id, CELL, "adapter"))

    rec = steps.run_adapter(store, sweep, CELL, COMPUTE, log=QUIET)
    assert rec["resumed_from_step"] == committed[0] and rec["steps"] == steps_total
    worst = _assert_same_adapter(_adapter_tensors(store, sweep, CELL, tmp_path / "got"), env["ref"]["sigterm_only"])
    assert store.list_keys(ckpts.prefix) == []
    report("sigterm_resume", steps=steps_total, sigterm_checkpoint_step=committed[0], sigterm_to_exit_s=round(exit_s, 2),
            max_abs_diff=worst)


# --- in-process: the handler, stale and corrupt checkpoints ------------------------------------------------------
def test_sigterm_handler_is_installed_only_while_training_and_restored(env, tmp_path):
    from zlt_dagster.core.models import load_model_cached
    from zlt_dagster.core.train import tokenize_dataset, train_cell

    store, sweep = env["store"], env["sweeps"]["periodic"]
    lm = load_model_cached("tiny", "cpu", sweep.protocol.train.precision)
    data = steps.load_onpolicy(store, sweep)
    examples = tokenize_dataset(lm, data, sweep.protocol)
    sentinel = []
    previous = signal.signal(signal.SIGTERM, lambda *_: sentinel.append("outer"))
    try:
        seen = []

        def on_saved(path, step, reason):
            seen.append((step, reason, signal.getsignal(signal.SIGTERM)))
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # "evicted" while the step-2 checkpoint is written

        cp = ck.Checkpointer(tmp_path / "c", every_steps=2, on_saved=on_saved)
        with pytest.raises(ck.TrainingInterrupted, match="SIGTERM received: stopped after step 2/"):
            train_cell(lm, examples, sweep.protocol, CELL, sweep.seed, tmp_path / "o", data_hash=data.data_hash,
                       checkpointer=cp)
        assert [(s, r) for s, r, _ in seen] == [(2, "periodic")]  # no second checkpoint for the same step
        assert seen[0][2] is not signal.getsignal(signal.SIGTERM)  # a different handler while training
        assert sentinel == []  # the outer handler did not run during training...
        os.kill(os.getpid(), signal.SIGTERM)
        assert sentinel == ["outer"]  # ...and is back afterwards
        # the checkpoint is complete: resuming from it finishes the run with the reference adapter
        cp2 = ck.Checkpointer(tmp_path / "c2", resume_dir=tmp_path / "c" / ck.step_dir_name(2))
        rec = train_cell(lm, examples, sweep.protocol, CELL, sweep.seed, tmp_path / "o2", data_hash=data.data_hash,
                         checkpointer=cp2)
        assert rec["resumed_from_step"] == 2
        from safetensors.torch import load_file
        _assert_same_adapter(load_file(str(tmp_path / "o2" / "adapter_model.safetensors")), env["ref"]["periodic"])
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_checkpoint_of_another_run_is_refused(env, tmp_path):
    from zlt_dagster.core.models import load_model_cached
    from zlt_dagster.core.train import tokenize_dataset, train_cell

    store, sweep = env["store"], env["sweeps"]["periodic"]
    lm = load_model_cached("tiny", "cpu", sweep.protocol.train.precision)
    data = steps.load_onpolicy(store, sweep)
    examples = tokenize_dataset(lm, data, sweep.protocol)
    cp = ck.Checkpointer(tmp_path / "c", every_steps=2)
    with pytest.raises(ck.TrainingInterrupted):
        cp.stop_signal = signal.SIGTERM  # as if SIGTERM came during step 1
        train_cell(lm, examples, sweep.protocol, CELL, sweep.seed, tmp_path / "o", data_hash=data.data_hash,
                   checkpointer=cp)
    other_seed = ck.Checkpointer(tmp_path / "x", resume_dir=tmp_path / "c" / ck.step_dir_name(1))
    with pytest.raises(ck.CheckpointError, match=r"belongs to another run \(differs in \['seed'\]\)"):
        train_cell(lm, examples, sweep.protocol, CELL, sweep.seed + 1, tmp_path / "o", data_hash=data.data_hash,
                   checkpointer=other_seed)


def test_corrupt_or_foreign_checkpoint_in_the_store_is_skipped(env, tmp_path):
    """A tampered checkpoint fails its sha256 and is skipped; one of another run is deleted; training restarts."""
    store, sweep = env["store"], env["sweeps"]["periodic"]
    cell = Cell(3e-3, 1)
    ckpts = StoreCheckpoints(store, layout.checkpoint_prefix(sweep.sweep_id, cell))
    good = tmp_path / "good"
    # a checkpoint of another cell's run, committed under this cell, then one whose bytes are tampered with
    src = StoreCheckpoints(store, layout.checkpoint_prefix(sweep.sweep_id, CELL))
    cp = ck.Checkpointer(good, every_steps=1, on_saved=lambda p, s, r: ckpts.push(p, s, r))
    from zlt_dagster.core.models import load_model_cached
    from zlt_dagster.core.train import tokenize_dataset, train_cell
    lm = load_model_cached("tiny", "cpu", sweep.protocol.train.precision)
    data = steps.load_onpolicy(store, sweep)
    examples = tokenize_dataset(lm, data, sweep.protocol)
    cp.stop_signal = signal.SIGTERM
    with pytest.raises(ck.TrainingInterrupted):
        train_cell(lm, examples, sweep.protocol, CELL, sweep.seed, tmp_path / "o", data_hash=data.data_hash,
                   checkpointer=cp)
    assert ckpts.committed_steps() == [1] and src.committed_steps() == []
    # tamper: a second, newer checkpoint whose adapter bytes do not match its manifest
    store.commit_artifact(f"{ckpts.prefix}/{ck.step_dir_name(2)}", tmp_path / "good" / ck.step_dir_name(1))
    key = f"{ckpts.prefix}/{ck.step_dir_name(2)}/adapter_state.safetensors"
    store.put_bytes(key, b"x" + store.get_bytes(key)[1:])
    logs = []
    rec = steps.run_adapter(store, sweep, cell, COMPUTE, log=logs.append)
    assert any("step 2 is unusable" in m and "corrupt" in m for m in logs), logs
    assert any("not usable" in m and "belongs to another run" in m for m in logs), logs
    assert rec["resumed_from_step"] is None and rec["steps"] > 0
    assert store.list_keys(ckpts.prefix) == []


def test_negative_control_resume_without_the_optimizer_state_differs(env, tmp_path, monkeypatch):
    """The equality above is not vacuous: resuming without restoring AdamW's moments gives a different adapter.
    (The global RNG is no longer part of it: dropout masks are seeded per example, core/lora_bank.py.)"""
    from safetensors.torch import load_file

    from zlt_dagster.core.models import load_model_cached
    from zlt_dagster.core.train import tokenize_dataset, train_cell

    store, sweep = env["store"], env["sweeps"]["periodic"]
    assert sweep.protocol.lora.dropout > 0
    lm = load_model_cached("tiny", "cpu", sweep.protocol.train.precision)
    data = steps.load_onpolicy(store, sweep)
    examples = tokenize_dataset(lm, data, sweep.protocol)
    cp = ck.Checkpointer(tmp_path / "c", every_steps=0)
    cp.stop_signal = signal.SIGTERM
    with pytest.raises(ck.TrainingInterrupted):
        train_cell(lm, examples, sweep.protocol, CELL, sweep.seed, tmp_path / "o", data_hash=data.data_hash,
                   checkpointer=cp)
    from zlt_dagster.core.bank_adamw import CellOptimizer

    monkeypatch.setattr(CellOptimizer, "load_state_dict", lambda *_: None)  # the moments stay at zero
    cp2 = ck.Checkpointer(tmp_path / "c2", resume_dir=tmp_path / "c" / ck.step_dir_name(1))
    train_cell(lm, examples, sweep.protocol, CELL, sweep.seed, tmp_path / "o2", data_hash=data.data_hash,
               checkpointer=cp2)
    got = load_file(str(tmp_path / "o2" / "adapter_model.safetensors"))
    assert any(not torch.allclose(got[k], v, rtol=1e-5, atol=1e-6) for k, v in env["ref"]["periodic"].items())
