"""torch.compile over a model's decoder layers, for training (core/train.py) and for the static decode
(generation/static_decode.py), and the rule `auto` follows for both (ZLT_TRAIN_COMPILE, ZLT_DECODE_COMPILE).

Per decoder layer, not the whole model: all layers share one code object, so one compiled graph serves all of
them; compiling the whole SmolLM2 decoder as one graph took 422 s on the H200 (BENCHMARKS.md, issue 18).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Iterator

import torch

from .. import settings
from .models import unwrap_peft

# `auto` compiles for models under this many parameters on CUDA. Training (BENCHMARKS.md, issue 18, SmolLM2-135M
# on the H200, same call): one cell 19.3k -> 32.5k tok/s, 5 cells 86.1k -> 136.9k, for ~20-30 s of compiling per
# process; 7B shapes compiled ran 7x SLOWER than eager when last measured (run 4, before the cell-count recompile
# fix) and were not measured since. The static decode: BENCHMARKS.md, issue 17 (third session); 7B not measured.
AUTO_MAX_PARAMETERS = 1_000_000_000
# graphs per layer code object a process may hold: a `zlt run` worker trains passes of several sizes and decodes
# (each a few graphs); dynamo's default of 8 would be passed and the layers would silently run eager
RECOMPILE_LIMIT = 64


def can_build_triton_kernels() -> bool:
    """Whether inductor's GPU kernels can be built here: Triton compiles a small C launcher per kernel with the C
    compiler ($CC, else cc/gcc/clang on PATH) against Python's headers (Python.h). Without them `auto` stays eager
    instead of failing inside a step (docker/Dockerfile installs both)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return bool(compiler) and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()


def parameter_count(model) -> int:
    return sum(p.numel() for p in unwrap_peft(model).parameters())


def backend_for(value: str, model, device: torch.device | None, name: str) -> str | None:
    """The torch.compile backend a setting asks for on `model`, whose weights are on `device` (None = eager).
    value: `auto` (or empty) = "inductor" on CUDA (compute capability >= 7.0: what Triton generates code for)
    where Triton can build kernels, for models under AUTO_MAX_PARAMETERS, else eager (eager also for model=None:
    the value is only being checked); off / 0 / false / eager = eager; else a torch.compile backend name.
    settings.SettingsError (a ValueError) naming `name` for a backend that does not exist or cannot run here
    (settings.check_compile_backend)."""
    value = settings.check_compile_backend(name, value)
    if value in settings.COMPILE_OFF:
        return None
    if value == "auto":
        if model is None or device is None or device.type != "cuda" or not can_build_triton_kernels():
            return None
        if torch.cuda.get_device_capability(device) < (7, 0):
            return None
        return "inductor" if parameter_count(model) < AUTO_MAX_PARAMETERS else None
    return value


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a transformers causal LM (peft wrapper looked through), in order."""
    decoder = unwrap_peft(model).get_decoder()
    return list(getattr(decoder, "layers", None) or [decoder])


@contextlib.contextmanager
def compiled_decoder_layers(model, backend: str | None, dynamic: bool | None,
                            unspecialized_module_ints: bool = False) -> Iterator[None]:
    """For the duration, every decoder layer of `model` runs through torch.compile(backend, dynamic=dynamic)
    (nothing if backend is None); on exit, also after an error, each layer runs as before (eager, or as an outer
    compile had it). dynamo's recompile limit is raised to RECOMPILE_LIMIT for the process and left there (it
    counts graphs per code object, which other users of the layers' class share).

    dynamic: torch.compile's (True = every size symbolic from the first graph; None = a size becomes symbolic once
    it is seen to change). unspecialized_module_ints: integer attributes of modules (a layer's `layer_idx`) are
    graph inputs instead of constants guarded on (dynamo's allow_unspec_int_on_nn_module): the decode's attention
    passes `self.layer_idx` to the cache, which would otherwise compile one graph per layer."""
    if backend is None:
        yield
        return
    layers = decoder_layers(model)
    before = [layer._compiled_call_impl for layer in layers]  # what nn.Module.compile sets; None = eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    with contextlib.ExitStack() as stack:
        if unspecialized_module_ints:
            stack.enter_context(torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True))
        try:
            for layer in layers:
                layer.compile(backend=backend, dynamic=dynamic)  # torch.nn.Module.compile: in place, names kept
            yield
        finally:
            for layer, impl in zip(layers, before):
                layer._compiled_call_impl = impl
