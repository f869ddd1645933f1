"""Resumable training: checkpoints of one cell's training state, and the stop-signal hook (SIGTERM: pod eviction;
SIGINT: Ctrl-C in `zlt run`).

A checkpoint is taken between two optimizer steps and holds everything the rest of the run depends on:
  adapter_state.safetensors   the cell's trainable LoRA tensors, by name (`<module>.lora_A`; exact copies)
  optimizer.pt                AdamW state (step counts, exp_avg, exp_avg_sq) + param groups (current lr)
  scheduler.pt                the LR scheduler position (last_epoch, last lr)
  rng.pt                      torch CPU RNG (+ every CUDA device's RNG); the LoRA dropout masks do not depend
                              on it (they are seeded per example, core/lora_bank.py), it is kept for anything else
  state.json                  position (global step; epoch and step-in-epoch follow from it because every epoch
                              has the same number of steps and its order is `epoch_order(seed, epoch)`), the loss
                              curve and counters so far, Python/NumPy RNG states, why it was written (periodic,
                              sigterm or sigint) and a fingerprint of the run (cell, seed, data hash, protocol
                              hash, sizes)
Restoring all of it and continuing from the next step gives the same adapter as a run that was never interrupted:
the data order of an epoch is a function of (seed, epoch) and a dropout mask of (seed, epoch, example index).
One trainer may train several cells at once (core/train.py); each cell has its own Checkpointer and directory.

`.pt` files are read with `torch.load(weights_only=True)` (no pickle code execution), and in the steps every
checkpoint is a committed artifact (sha256 manifest written last), so a torn or tampered checkpoint is never used.

Where they live: this module writes each one locally; steps/checkpoints.py commits it to the object store under
`sweeps/<id>/cells/<cell>/checkpoint/step-00000040/` and deletes older ones; a rerun of the cell resumes from the
newest committed one; all are deleted once the final adapter is committed (steps/adapter.py).

SIGTERM and SIGINT: while `train_cells` runs, a handler only sets a flag (it cannot save mid-backward); at the next
step boundary the trainer writes one checkpoint per unfinished cell (reason "sigterm" / "sigint"), restores the
previous handlers and raises `TrainingInterrupted`. Kubernetes sends SIGTERM on eviction/preemption and SIGKILL
after terminationGracePeriodSeconds, so a step plus one checkpoint upload must fit in that grace period. SIGINT is
Ctrl-C in a terminal (`zlt run`): Dagster's own SIGINT handler inside a step raises at whatever line is running,
which would lose the step in progress and never write the checkpoint, so training takes SIGINT over as well.
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

CHECKPOINT_FORMAT = 2  # 2: tensors named by module (one cell of a LoRA bank), not by peft parameter path
STATE_FILE = "state.json"
FILES = ("adapter_state.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", STATE_FILE)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not belong to this run."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal (SIGTERM or SIGINT) after writing a checkpoint; a rerun of the cell resumes
    from it. ``signum`` is the signal, ``step`` the last optimizer step completed."""

    def __init__(self, message: str, step: int, signum: int, total_steps: int | None = None):
        super().__init__(message)
        self.step = step
        self.signum = signum
        self.total_steps = total_steps


@dataclass
class TrainState:
    """The loop's counters; everything else lives in the model, optimizer, scheduler and RNGs."""
    step: int = 0                     # optimizer steps completed
    tokens: int = 0
    supervised: int = 0
    curve: list = field(default_factory=list)
    wall_s: float = 0.0               # training wall time of the segments before this one
    resumed_from_step: int | None = None
    checkpoints_written: int = 0
    segments: int = 1                 # 1 + how many times the run was resumed


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_step_dir(name: str) -> int | None:
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def _rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor part for rng.pt, JSON part for state.json)."""
    tensors: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    py = random.getstate()
    js: dict[str, Any] = {"python": [py[0], list(py[1]), py[2]]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        js["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return tensors, js


def _set_rng_state(tensors: dict[str, Any], js: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        states = tensors["cuda"]
        if len(states) != torch.cuda.device_count():
            raise CheckpointError(f"checkpoint has RNG states of {len(states)} CUDA devices, this process sees "
                                  f"{torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(states)
    if "python" in js:
        v, st, gauss = js["python"]
        random.setstate((v, tuple(st), gauss))
    if "numpy" in js:
        import numpy as np

        kind, keys, pos, has_gauss, cached = js["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


Params = Mapping[str, torch.Tensor]  # one cell's trainable tensors by name (LoraBank.params(j))


def trainable_state(params: Params) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").clone().contiguous() for n, p in params.items()}


def save_checkpoint(path: Path, params: Params, opt, sched, state: TrainState, fingerprint: dict,
                    reason: str) -> Path:
    """Write one checkpoint directory (into a temp sibling, renamed when complete)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(params), str(tmp / "adapter_state.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save(sched.state_dict(), tmp / "scheduler.pt")
    rng_tensors, rng_json = _rng_state()
    torch.save(rng_tensors, tmp / "rng.pt")
    doc = {"format": CHECKPOINT_FORMAT, "reason": reason, "fingerprint": fingerprint, "rng": rng_json,
           "step": state.step, "tokens": state.tokens, "supervised": state.supervised, "curve": state.curve,
           "wall_s": state.wall_s, "checkpoints_written": state.checkpoints_written, "segments": state.segments}
    (tmp / STATE_FILE).write_text(json.dumps(doc))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def read_state(path: Path) -> dict:
    try:
        doc = json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_FILE}: {e}") from e
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {doc.get('format')!r}, this code reads {CHECKPOINT_FORMAT}")
    return doc


def load_checkpoint(path: Path, params: Params, opt, sched, fingerprint: dict) -> TrainState:
    """Restore model/optimizer/scheduler/RNG from `path`; refuse a checkpoint of another run."""
    from safetensors.torch import load_file

    path = Path(path)
    doc = read_state(path)
    if doc.get("fingerprint") != fingerprint:
        diff = sorted(k for k in set(fingerprint) | set(doc.get("fingerprint") or {})
                      if (doc.get("fingerprint") or {}).get(k) != fingerprint.get(k))
        raise CheckpointError(f"checkpoint {path} belongs to another run (differs in {diff})")
    tensors = load_file(str(path / "adapter_state.safetensors"))
    params = dict(params)
    wanted = set(params)
    if set(tensors) != wanted:
        raise CheckpointError(f"checkpoint {path}: trainable tensors differ from the model's "
                              f"({len(tensors)} vs {len(wanted)})")
    with torch.no_grad():
        for n, t in tensors.items():
            if params[n].shape != t.shape:
                raise CheckpointError(f"checkpoint {path}: {n} has shape {tuple(t.shape)}, the model "
                                      f"{tuple(params[n].shape)}")
            params[n].copy_(t)
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    sched.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True), doc.get("rng", {}))
    return TrainState(step=doc["step"], tokens=doc["tokens"], supervised=doc["supervised"], curve=doc["curve"],
                      wall_s=doc["wall_s"], resumed_from_step=doc["step"],
                      checkpoints_written=doc.get("checkpoints_written", 0), segments=doc.get("segments", 1) + 1)


class Checkpointer:
    """What `train.train_cells` talks to, one per cell. Local only; `on_saved(path, step, reason)` is called after each write
    (the pipeline commits the directory to the object store there) and `resume_dir` is a checkpoint to start from.

    every_steps: periodic checkpoints every N optimizer steps (0 = none; the one on a stop signal is still written).
    handle_signals: take SIGTERM and SIGINT over while training (stop_signal_flags); False leaves them alone.
    """

    def __init__(self, local_dir: str | Path, every_steps: int = 0, resume_dir: str | Path | None = None,
                 on_saved: Callable[[Path, int, str], None] | None = None, handle_signals: bool = True,
                 log: Callable[[str], None] | None = None):
        if every_steps < 0:
            raise ValueError(f"checkpoint_every_steps must be >= 0, got {every_steps}")
        self.local_dir = Path(local_dir)
        self.every_steps = every_steps
        self.resume_dir = Path(resume_dir) if resume_dir else None
        self.on_saved = on_saved
        self.handle_signals = handle_signals
        self.log = log or (lambda _m: None)
        self.stop_signal: int | None = None
        self.last_saved_step: int | None = None

    # -- called by train_cells -------------------------------------------------------------------------------
    def restore(self, params: Params, opt, sched, fingerprint: dict) -> TrainState | None:
        if self.resume_dir is None:
            return None
        state = load_checkpoint(self.resume_dir, params, opt, sched, fingerprint)
        self.last_saved_step = state.step
        self.log(f"resuming from the checkpoint of step {state.step} ({self.resume_dir.name})")
        return state

    def after_step(self, params: Params, opt, sched, state: TrainState, fingerprint: dict, total_steps: int,
                   interrupt: bool = True) -> None:
        """Periodic checkpoint if due; on a pending stop signal: checkpoint (unless this step has one) and, with
        `interrupt`, raise TrainingInterrupted (a trainer of several cells saves every cell first, then raises)."""
        due = self.every_steps and state.step % self.every_steps == 0 and state.step < total_steps
        if due:
            self.save(params, opt, sched, state, fingerprint, "periodic")
        if self.stop_signal is not None and state.step < total_steps:
            if self.last_saved_step != state.step:
                self.save(params, opt, sched, state, fingerprint, signal.Signals(self.stop_signal).name.lower())
            if interrupt:
                raise self.interrupted(state.step, total_steps)

    def interrupted(self, step: int, total_steps: int) -> TrainingInterrupted:
        name = signal.Signals(self.stop_signal or signal.SIGTERM).name
        return TrainingInterrupted(f"{name} received: stopped after step {step}/{total_steps} with a "
                                   f"checkpoint; rerun the cell to resume", step, self.stop_signal or 0, total_steps)

    def save(self, params: Params, opt, sched, state: TrainState, fingerprint: dict, reason: str) -> Path:
        state.checkpoints_written += 1
        path = save_checkpoint(self.local_dir / step_dir_name(state.step), params, opt, sched, state, fingerprint,
                               reason)
        self.last_saved_step = state.step
        if self.on_saved is not None:
            self.on_saved(path, state.step, reason)
        for old in self.local_dir.iterdir():  # keep only the newest local copy
            s = parse_step_dir(old.name)
            if old != path and (s is None or s < state.step):
                shutil.rmtree(old, ignore_errors=True)
        return path


@contextlib.contextmanager
def signal_handlers(signals, handler) -> Iterator[None]:
    """`handler` for each of `signals` while the block runs; the previous handlers are put back afterwards. Python
    only delivers signals to the main thread, so elsewhere this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextlib.contextmanager
def stop_signal_flags(checkpointers: "list[Checkpointer]") -> Iterator[None]:
    """For the duration of training, SIGTERM and SIGINT set `stop_signal` on every checkpointer (of every cell
    trained together); the previous handlers are restored afterwards (`signal_handlers`). A no-op when no
    checkpointer handles signals, or outside the main thread."""
    handlers = [c for c in checkpointers if c.handle_signals]
    if not handlers:
        yield
        return

    def _flag(signum, _frame):
        if handlers[0].stop_signal is None:
            handlers[0].log(f"{signal.Signals(signum).name} received: checkpointing at the end of this step")
        for c in handlers:
            c.stop_signal = signum

    with signal_handlers(STOP_SIGNALS, _flag):
        yield
