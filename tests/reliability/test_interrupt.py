"""Ctrl-C (SIGINT) and SIGTERM stop an in-process `zlt run` promptly: the training loop finishes its optimizer step,
commits a checkpoint, the step fails without a retry, `zlt` exits 128 + signal with one line saying so, and
rerunning the same command resumes from that checkpoint and finishes."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# one cell of 12 epochs (~40 optimizer steps of the tiny model): long enough to be interrupted twice
SWEEP = ("protocol: {base: tiny, epochs: [1, 12]}\nbase_model: tiny\nsource_persona: villain\nseed: 3\n"
         "cells: [[1.0e-3, 12]]\n")


class Zlt:
    """`zlt run` in a subprocess, its output (stdout and stderr) read line by line as it comes."""

    def __init__(self, tmp_path: Path):
        env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "ZLT_ARTIFACT_ROOT": str(tmp_path / "art"),
               "ZLT_ARC_SOURCE": "sample", "ZLT_DEVICE": "cpu", "ZLT_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "zlt_dagster.cli", "run", str(tmp_path / "s.yaml")],
                                     cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, needle: str, timeout: float = 240.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if needle in line:
                return line
        raise AssertionError(f"{needle!r} not seen; output:\n{''.join(self.lines)}")

    def finish(self, timeout: float) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        while (line := self._q.get(timeout=10)) is not None:
            self.lines.append(line)
        return rc, "".join(self.lines)


def _interrupt_during_training(tmp_path: Path, sig: int, after: str) -> tuple[str, float]:
    zlt = Zlt(tmp_path)
    zlt.wait_for(after)
    zlt.wait_for("epoch ")  # a training epoch ended: the pass is under way
    zlt.proc.send_signal(sig)
    t0 = time.monotonic()
    rc, out = zlt.finish(timeout=60)
    took = time.monotonic() - t0
    name = signal.Signals(sig).name
    assert rc == 128 + sig, out
    last = out.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"zlt: interrupted by {name} during training pass of 1 cell(s) (adapter: training "
                           "stopped after step "), out
    assert last.endswith("checkpoint committed); finished work is kept: rerun the same command to resume"), out
    assert "retrying" not in out and "evaluation" not in out, out  # stopped, not retried, nothing after
    assert "Traceback" not in out and "Warning" not in out, out  # one line, no Dagster error block or beta warnings
    assert took < 30, f"{name} took {took:.1f} s to stop the run"
    return out, took


def test_sigint_and_sigterm_stop_zlt_run_and_a_rerun_resumes(tmp_path):
    (tmp_path / "s.yaml").write_text(SWEEP)
    _interrupt_during_training(tmp_path, signal.SIGINT, "training 1 cell(s) in one pass")
    [state] = [json.loads(p.read_text()) for p in (tmp_path / "art").rglob("checkpoint/*/state.json")]
    assert state["reason"] == "sigint" and state["step"] > 0
    first = state["step"]

    out, _ = _interrupt_during_training(tmp_path, signal.SIGTERM, f"resuming from the checkpoint of step {first}")
    [state] = [json.loads(p.read_text()) for p in (tmp_path / "art").rglob("checkpoint/*/state.json")]
    assert state["reason"] == "sigterm" and state["step"] > first

    zlt = Zlt(tmp_path)
    rc, out = zlt.finish(timeout=300)
    assert rc == 0, out
    assert f"resuming from the checkpoint of step {state['step']}" in out and "cell 1/1" in out
    # the line names the cell it is about (a pass trains many)
    assert any(line.strip().split(": ")[-2].startswith("lr=") for line in out.splitlines()
               if f"resuming from the checkpoint of step {state['step']}" in line)
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "art").rglob("adapter/train_run.json")]
    assert record["segments"] == 3 and record["resumed_from_step"] == state["step"]
    assert not list((tmp_path / "art").rglob("checkpoint/*/state.json"))  # deleted once the adapter is committed


def test_training_takes_sigint_and_sigterm_over_and_gives_them_back(tmp_path):
    """While training, both signals only set the checkpointer's flag (the step in progress finishes); afterwards the
    handlers in place before (Dagster's, inside a step) are back."""
    from zlt_dagster.core import checkpoint as ck

    before = {s: signal.getsignal(s) for s in ck.STOP_SIGNALS}
    for sig in ck.STOP_SIGNALS:
        cp = ck.Checkpointer(tmp_path)
        with ck.stop_signal_flags([cp]):
            os.kill(os.getpid(), sig)
            time.sleep(0.01)
            assert cp.stop_signal == sig
        assert {s: signal.getsignal(s) for s in ck.STOP_SIGNALS} == before


def test_an_interrupt_fails_the_step_without_retry_only_in_zlt_runs():
    """`zlt run` tags its runs zlt/on_interrupt=stop: an interrupted step fails at once (Failure without retries,
    Dagster's retry policy would rerun it); any other run (a step pod evicted by Kubernetes) keeps the transient
    TrainingInterrupted / DagsterExecutionInterruptedError, which the retry policy retries and resumes."""
    from types import SimpleNamespace

    import pytest
    from dagster import AssetKey, DagsterExecutionInterruptedError

    from zlt_dagster.core.checkpoint import TrainingInterrupted
    from zlt_dagster.defs.assets import INTERRUPT_TAG, StepInterrupted, _stops_on_interrupt

    def ctx(tags):
        return SimpleNamespace(run=SimpleNamespace(tags=tags), asset_key=AssetKey("adapter"))

    cases = [(TrainingInterrupted("SIGINT received", 4, signal.SIGINT, 40), "SIGINT",
              "training stopped after step 4/40, checkpoint committed"),
             (DagsterExecutionInterruptedError(), "", "interrupted")]  # Dagster does not say which signal
    for exc, name, what in cases:
        @_stops_on_interrupt
        def body(context, exc=exc):
            raise exc

        with pytest.raises(StepInterrupted) as e:
            body(ctx({INTERRUPT_TAG: "stop"}))
        assert e.value.allow_retries is False and (e.value.step, e.value.signal_name, e.value.what) == (
            "adapter", name, what)
        with pytest.raises(type(exc)):
            body(ctx({}))
