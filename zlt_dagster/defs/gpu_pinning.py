"""One GPU per process on a host with several: what lets two steps (or two `zlt run` workers) train and generate at
once, each on its own GPU.

A process that does GPU work and sees more than one GPU takes the first free one's host-local lock (an exclusive
`flock` on `<ZLT_GPU_LOCK_DIR>/gpu-<id>.lock`, held until the process exits; the kernel drops it when the process
dies, so a killed step never keeps a GPU) and sets `CUDA_VISIBLE_DEVICES` to that GPU alone, before CUDA starts in
the process. Every later `cuda` in the process is then that GPU. When every GPU is held, it waits for one.

Why CUDA_VISIBLE_DEVICES and not torch.cuda.set_device: it also binds what the code does not name (torch.compile's
kernels, CUDA graphs, free-memory queries, a library's own `cuda`), and it is what a Kubernetes GPU pod already
sees (one GPU: nothing to choose, nothing pinned). Who calls it: the `compute` resource when a step starts
(Dagster's multiprocess executor and the run launcher start each step / run in its own process), and each worker
of `zlt run --gpus N` (defs/runner.py).
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

_PINNED: dict = {}  # {"gpu": the CUDA_VISIBLE_DEVICES entry taken, "lock": its open lock file} for this process
_VISIBLE: list[str] | None = None  # the GPU count probed in a child interpreter, once per process
WAIT_LOG_S = 60.0  # while waiting for a GPU, one line per this many seconds


class GpuPinningError(RuntimeError):
    """CUDA started in this process before a GPU was pinned: CUDA_VISIBLE_DEVICES no longer applies."""


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (indices or UUIDs): that variable's list
    where it is set (CUDA's convention: an empty value hides every GPU), else one index per GPU torch counts.
    The count comes from a child interpreter: counting in this process would start CUDA here (cuInit reads
    CUDA_VISIBLE_DEVICES once), after which no GPU can be pinned. A CPU build of torch counts none, unprobed."""
    global _VISIBLE
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    if torch.version.cuda is None:
        return []
    if _VISIBLE is None:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                             capture_output=True, text=True, check=True).stdout
        _VISIBLE = [str(i) for i in range(int(out.strip().splitlines()[-1]))]
    return list(_VISIBLE)


def pinned_gpu() -> str | None:
    """The GPU this process pinned (its CUDA_VISIBLE_DEVICES entry), or None."""
    return _PINNED.get("gpu")


def _try_lock(path: Path):
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def pin_gpu(lock_dir: str | Path, log: Callable[[str], None] = print, poll_s: float = 1.0) -> str | None:
    """Pin this process to one free GPU of `visible_gpus()` (see the module docstring) and return its
    CUDA_VISIBLE_DEVICES entry; None (nothing done) where at most one GPU is visible. Idempotent: a pinned process
    keeps its GPU. Waits (polling every `poll_s` seconds, a line to `log` every WAIT_LOG_S) while all are held.
    Raises GpuPinningError when CUDA already started here with more than one GPU visible."""
    if "gpu" in _PINNED:
        return _PINNED["gpu"]
    gpus = visible_gpus()
    if len(gpus) <= 1:
        return None
    if torch.cuda.is_initialized():
        raise GpuPinningError(f"CUDA started in this process before a GPU was pinned ({len(gpus)} visible): pin "
                              "before any CUDA call")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    t0, last_log = time.monotonic(), -WAIT_LOG_S
    while True:
        for gpu in gpus:
            lock = _try_lock(lock_dir / f"gpu-{gpu}.lock")
            if lock is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu
                _PINNED.update(gpu=gpu, lock=lock)
                _check_cuda_sees_one()
                waited = time.monotonic() - t0
                log(f"pinned to GPU {gpu} of {','.join(gpus)}" + (f" after waiting {waited:.0f} s" if waited >= 1
                                                                    else ""))
                return gpu
        if time.monotonic() - last_log >= WAIT_LOG_S:
            last_log = time.monotonic()
            log(f"all {len(gpus)} GPUs are held by other processes (locks in {lock_dir}); waiting for one")
        time.sleep(poll_s)


def _check_cuda_sees_one() -> None:
    """A driver started before the pin (a `torch.cuda.is_available()` counts the devices, which starts it without
    torch noticing) still shows every GPU: refuse that, rather than run on GPU 0 while holding another's lock."""
    if torch.version.cuda is None:
        return
    # the CUDA runtime's own count: torch.cuda.device_count() prefers NVML, which re-reads the variable and would
    # say 1 even where the driver started earlier with every GPU
    seen = torch._C._cuda_getDeviceCount()
    if seen != 1:
        raise GpuPinningError(f"CUDA started in this process before a GPU was pinned: it sees {seen} GPUs after "
                              f"CUDA_VISIBLE_DEVICES={_PINNED['gpu']}; pin before any CUDA call")
