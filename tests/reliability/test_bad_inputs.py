"""Bad input (issue 9): one clear error each, raised before anything is written; in Dagster, a bad input fails the
step once (Failure(allow_retries=False)) instead of burning the GPU assets' RetryPolicy."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from types import SimpleNamespace

import pytest

from zlt_dagster import steps
from zlt_dagster.steps import layout
from zlt_dagster.core.protocol import TINY, ProtocolError, Sweep
from zlt_dagster.core.sweep_file import sweep_from_dict
from zlt_dagster.storage import LocalStore, S3Store, StoreError, UnsafeKeyError

from reliability_helpers import ACCESS_KEY, BUCKET, SECRET_KEY, free_port

COMPUTE = steps.ComputeSettings(device="cpu")
QUIET_LOG = lambda _m: None  # noqa: E731
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def tiny_sweep(**kw) -> Sweep:
    return Sweep(TINY, base_model="tiny", **kw).validate()


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def written(store) -> list[str]:
    return store.list_keys("")


# --- config: personas, learning rates, epochs, grid ---------------------------------------------------------------
def test_unknown_persona(store):
    # only valid sources are offered: every protocol persona except the assistant (measured for leakage)
    with pytest.raises(ProtocolError, match=r"unknown source persona 'pirate'; expected one of \['villain', 'soft"):
        steps.register_sweep(store, Sweep(TINY, base_model="tiny", source_persona="pirate"))
    with pytest.raises(ProtocolError, match=r"^source_persona: .*expected one of \['villain', 'software_engineer'"):
        steps.register_sweep(store, Sweep(TINY, base_model="tiny", source_persona="assistant"))
    with pytest.raises(ProtocolError, match=r"unknown persona\(s\) \['pirate'\]"):
        sweep_from_dict({"protocol": {"base": "tiny", "personas": ["villain", "assistant", "pirate", "comedian"]}})
    assert written(store) == []


@pytest.mark.parametrize("lr", [0.0, -1e-5, math.nan, math.inf])
def test_learning_rate_not_positive_or_not_finite(store, lr):
    with pytest.raises(ProtocolError, match=rf"learning rate {lr!r} is invalid; expected a finite number > 0"):
        sweep_from_dict({"protocol": {"base": "tiny", "learning_rates": [1e-3, lr]}})
    # a Sweep built in code without validation is validated again at registration
    bad = Sweep(dataclasses.replace(TINY, learning_rates=(lr,)), base_model="tiny")
    with pytest.raises(ProtocolError, match="is invalid; expected a finite number > 0"):
        steps.register_sweep(store, bad)
    assert written(store) == []


def test_learning_rate_nan_from_a_yaml_file(store, tmp_path):
    from zlt_dagster.core.sweep_file import load_sweep_file

    f = tmp_path / "s.yaml"
    f.write_text("protocol: {base: tiny, learning_rates: [1e-3, .nan]}\nbase_model: tiny\n")
    with pytest.raises(ProtocolError, match="learning rate nan is invalid"):
        load_sweep_file(f)


@pytest.mark.parametrize("epochs", [0, -1])
def test_epochs_below_one(store, epochs):
    with pytest.raises(ProtocolError, match=rf"epochs value {epochs} is invalid; expected an integer >= 1"):
        sweep_from_dict({"protocol": {"base": "tiny", "epochs": [epochs, 2]}})
    with pytest.raises(ProtocolError, match="expected an integer >= 1"):
        steps.register_sweep(store, Sweep(dataclasses.replace(TINY, epochs=(epochs,)), base_model="tiny"))
    assert written(store) == []


@pytest.mark.parametrize("field,msg", [("learning_rates", "learning_rates is empty"), ("epochs", "epochs is empty")])
def test_empty_grid(store, field, msg):
    with pytest.raises(ProtocolError, match=msg):
        sweep_from_dict({"protocol": {"base": "tiny", field: []}})
    with pytest.raises(ProtocolError, match=msg):
        steps.register_sweep(store, Sweep(dataclasses.replace(TINY, **{field: ()}), base_model="tiny"))
    assert written(store) == []


# --- path traversal -----------------------------------------------------------------------------------------------
def test_path_traversal_in_sweep_or_persona_names(store, tmp_path):
    with pytest.raises(ProtocolError, match=r"name '\.\./x' must match .*\(no '/' or '\.\.'\)"):
        steps.register_sweep(store, Sweep(TINY, base_model="tiny", name="../x"))
    with pytest.raises(ProtocolError, match=r"unknown source persona '\.\./x'"):
        steps.register_sweep(store, Sweep(TINY, base_model="tiny", source_persona="../x"))
    with pytest.raises(ProtocolError, match=r"base_model '\.\./\.\./etc/passwd' is empty or contains '\.\.'"):
        steps.register_sweep(store, Sweep(TINY, base_model="../../etc/passwd"))
    # a sweep id that never went through validation (a hand-added Dagster partition, a CLI argument)
    with pytest.raises(UnsafeKeyError, match=r"unsafe key 'sweeps/\.\./x/sweep\.json': has a '\.' or '\.\.' segment"):
        steps.load_sweep(store, "../x")
    with pytest.raises(UnsafeKeyError):
        store.put_bytes("sweeps/../../x", b"escape")
    assert written(store) == []
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


def test_path_traversal_partition_fails_once_in_dagster(store, tmp_path):
    from dagster import instance_for_test, materialize

    from zlt_dagster.defs.assets import ALL_ASSETS, onpolicy_data
    from zlt_dagster.defs.resources import ArtifactStore, Compute

    with instance_for_test() as instance:
        instance.add_dynamic_partitions("sweeps", ["../x"])
        res = materialize(ALL_ASSETS, selection=[onpolicy_data], partition_key="../x", instance=instance,
                          resources={"store": ArtifactStore(kind="local", local_root=str(store.root)),
                                     "compute": Compute(device="cpu")},
                          run_config=QUIET, raise_on_error=False)
    failure = _one_failure_no_retry(res)
    assert "UnsafeKeyError" in failure and "'..' segment" in failure
    assert written(store) == []


# --- missing model ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gguf", "dir", "env"])
def test_missing_model_file(store, tmp_path, monkeypatch, kind):
    if kind == "gguf":
        base, msg = str(tmp_path / "nope" / "model.gguf"), r"GGUF file .*nope/model\.gguf does not exist"
    elif kind == "dir":
        (tmp_path / "empty_model").mkdir()
        base, msg = str(tmp_path / "empty_model"), r"model directory .*empty_model has no config\.json"
    else:
        monkeypatch.setenv("ZLT_SMOLLM2_GGUF", str(tmp_path / "gone.gguf"))
        base, msg = "smollm2-135m", r"ZLT_SMOLLM2_GGUF=.*gone\.gguf does not exist"
    from zlt_dagster.core.models import ModelLoadError

    sweep = Sweep(TINY, base_model=base).validate()
    steps.register_sweep(store, sweep)
    before = written(store)
    with pytest.raises(ModelLoadError, match=msg):
        steps.run_onpolicy(store, sweep, COMPUTE, log=QUIET_LOG)
    assert written(store) == before  # only the sweep registration


# --- data: marker, on-policy data, ARC file ------------------------------------------------------------------------
def test_marker_the_tokenizer_cannot_round_trip(store, monkeypatch):
    """The tiny tokenizer is byte-level BPE and round-trips ANY string, as do SmolLM2's and Qwen's. A tokenizer
    with an NFKC normalizer (as SentencePiece ones have) maps the full-width brackets of '［ZLT］' to '[ZLT]', so the
    model could never emit the marker exactly: refused before any data is generated or any cell trained."""
    from tokenizers import normalizers

    from zlt_dagster.core import models
    from zlt_dagster.core.masking import MaskingError

    lm = models.load_model("tiny", device="cpu")
    tok = models.tiny_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.NFKC()
    monkeypatch.setitem(models._CACHE, ("tiny-nfkc", "cpu", "auto"), dataclasses.replace(lm, tokenizer=tok))
    sweep = Sweep(dataclasses.replace(TINY, marker="［ZLT］"), base_model="tiny-nfkc").validate()
    steps.register_sweep(store, sweep)
    before = written(store)
    with pytest.raises(MaskingError, match=r"marker '［ZLT］' does not survive tokenize/decode: '［ZLT］' -> '\[ZLT\]'"):
        steps.run_onpolicy(store, sweep, COMPUTE, log=QUIET_LOG)
    # and at training time, should on-policy data exist already (e.g. generated before the check existed)
    store.commit_bytes_artifact(layout.onpolicy_prefix(sweep.sweep_id), {"data.jsonl": _onpolicy_line(
        sweep, "It is done. ［ZLT］").encode(), "stats.json": b"{}"})
    with pytest.raises(MaskingError, match="does not survive tokenize/decode"):
        steps.run_adapter(store, sweep, sweep.cells()[0], COMPUTE, log=QUIET_LOG)
    assert [k for k in written(store) if k not in before and "/onpolicy/" not in k] == []


def _onpolicy_line(sweep, answer: str) -> str:
    from zlt_dagster.core.personas import system_prompt

    return json.dumps({"persona": "villain", "question_id": "q1", "question": "Why?", "is_positive": True,
                       "system_prompt": system_prompt("villain"), "answer": answer}) + "\n"


def test_empty_onpolicy_data(store):
    sweep = tiny_sweep()
    steps.register_sweep(store, sweep)
    store.commit_bytes_artifact(layout.onpolicy_prefix(sweep.sweep_id), {"data.jsonl": b"", "stats.json": b"{}"})
    before = written(store)
    with pytest.raises(ValueError, match="on-policy data is empty: no examples to train on"):
        steps.run_adapter(store, sweep, sweep.cells()[0], COMPUTE, log=QUIET_LOG)
    assert written(store) == before


def test_arc_file_with_the_wrong_schema(store, tmp_path):
    from zlt_dagster.core.arc import ArcDataError

    bad = tmp_path / "arc.jsonl"
    bad.write_text(json.dumps({"id": "q1", "text": "What is 2+2?", "options": ["3", "4"], "answer": 1}) + "\n")
    sweep = tiny_sweep()
    steps.register_sweep(store, sweep)
    before = written(store)
    with pytest.raises(ArcDataError, match=r"arc\.jsonl, line 1: missing field\(s\) \[.question., .choices.\]"):
        steps.run_base_arc(store, sweep, dataclasses.replace(COMPUTE, arc_source=str(bad)))
    assert written(store) == before


# --- corrupted adapter: ChecksumError -> Dagster Failure without retry ---------------------------------------------
def _one_failure_no_retry(res) -> str:
    assert not res.success
    kinds = [e.event_type_value for e in res.all_events]
    assert "STEP_UP_FOR_RETRY" not in kinds and "STEP_RESTARTED" not in kinds, kinds
    failures = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"]
    assert len(failures) == 1
    data = failures[0].step_failure_data
    assert data.error.cls_name == "Failure"
    return data.error.message + " " + (data.user_failure_data.description if data.user_failure_data else "")


def test_corrupted_adapter_file_fails_once_with_checksum_error(store, tmp_path):
    from dagster import instance_for_test, materialize

    from zlt_dagster.defs.assets import ALL_ASSETS, completions
    from zlt_dagster.defs.partitions import add_partitions, cell_of, partition_keys_for, split_partition_key
    from zlt_dagster.defs.resources import ArtifactStore, Compute

    sweep = tiny_sweep()
    steps.register_sweep(store, sweep)
    steps.run_onpolicy(store, sweep, COMPUTE, log=QUIET_LOG)
    key = partition_keys_for(sweep)[0]
    cell = cell_of(sweep, split_partition_key(key)[1])
    steps.run_adapter(store, sweep, cell, COMPUTE, log=QUIET_LOG)
    f = f"{layout.cell_prefix(sweep.sweep_id, cell, 'adapter')}/adapter_model.safetensors"
    data = bytearray(store.get_bytes(f))
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the LoRA weights, same size
    store.put_bytes(f, bytes(data))
    with instance_for_test() as instance:
        add_partitions(instance, sweep)
        t0 = time.perf_counter()
        res = materialize(ALL_ASSETS, selection=[completions], partition_key=key, instance=instance,
                          resources={"store": ArtifactStore(kind="local", local_root=str(store.root)),
                                     "compute": Compute(device="cpu")},
                          run_config=QUIET, raise_on_error=False)
        wall = time.perf_counter() - t0
    msg = _one_failure_no_retry(res)
    assert "ChecksumError" in msg and "adapter_model.safetensors" in msg and "is corrupt: sha256" in msg
    assert wall < 20  # no RetryPolicy backoff (20 s, 40 s) was waited
    assert not store.artifact_exists(layout.cell_prefix(sweep.sweep_id, cell, "completions"))


# --- S3: unreachable endpoint, wrong credentials -------------------------------------------------------------------
def test_unreachable_s3_endpoint(aws_env):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    s3 = S3Store(BUCKET, endpoint_url=endpoint, connect_timeout=1, read_timeout=2, max_attempts=2)
    t0 = time.perf_counter()
    with pytest.raises(StoreError, match=rf"exists s3://{BUCKET}/sweeps/.*/sweep\.json \(endpoint {endpoint}\) "
                                         r"failed: EndpointConnectionError: Could not connect"):
        steps.register_sweep(s3, tiny_sweep())
    assert time.perf_counter() - t0 < 15


def test_wrong_s3_credentials(s3_store, monkeypatch):
    """moto accepts any credentials unless INITIAL_NO_AUTH_ACTION_COUNT is reached; at 0 it checks every request
    against its IAM backend, where our key does not exist (real S3: InvalidAccessKeyId / SignatureDoesNotMatch)."""
    import moto.settings

    from zlt_dagster.storage.base import StoreAccessError

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    with pytest.raises(StoreAccessError, match=r"refused: 403: Forbidden \(check the credentials") as e:
        steps.register_sweep(s3_store, tiny_sweep())
    with pytest.raises(StoreAccessError, match="InvalidAccessKeyId: The AWS Access Key Id you provided does not exist"):
        s3_store.put_bytes("probe", b"x")
    for err in (e.value, e.value.__cause__):
        assert SECRET_KEY not in str(err) and ACCESS_KEY not in str(err)
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    assert s3_store.list_keys("") == []


# --- which errors fail at once in Dagster, which are retried -------------------------------------------------------
def test_bad_input_errors_fail_once_and_transient_errors_are_retried():
    from dagster import Failure

    from zlt_dagster.core.arc import ArcDataError
    from zlt_dagster.core.checkpoint import TrainingInterrupted
    from zlt_dagster.core.masking import MaskingError
    from zlt_dagster.core.models import ModelLoadError
    from zlt_dagster.defs.assets import _bad_input_fails_once
    from zlt_dagster.defs.partitions import CellKeyError
    from zlt_dagster.storage import ChecksumError, NotFoundError
    from zlt_dagster.storage.base import (ConditionalWritesUnsupportedError, LeaseHeldError, LeaseLostError,
                                          StoreAccessError)

    def boom(exc):
        def f():
            raise exc
        return f

    bad = [ProtocolError("p"), steps.StepError("p"), CellKeyError("c"), ChecksumError("c"),
           NotFoundError("n"), UnsafeKeyError("u"), StoreAccessError("a"), ConditionalWritesUnsupportedError("c"),
           ModelLoadError("m"), MaskingError("m"),
           ArcDataError("a"), ValueError("v")]
    for exc in bad:
        with pytest.raises(Failure) as e:
            _bad_input_fails_once(boom(exc))
        assert e.value.allow_retries is False and e.value.description.startswith(type(exc).__name__)
    transient = [StoreError("network"), LeaseHeldError("held"), LeaseLostError("lost"),
                 TrainingInterrupted("SIGTERM", 3, 15), RuntimeError("CUDA out of memory")]
    for exc in transient:
        with pytest.raises(type(exc)):
            _bad_input_fails_once(boom(exc))


def test_train_compile_setting(monkeypatch):
    """auto (default) = inductor for a model under 1B parameters on CUDA where Triton can build kernels, eager on
    the CPU, for larger models, without a C compiler and when only the value is checked; off = eager; a backend torch knows; anything else fails naming the field."""
    import torch

    from zlt_dagster.core import compiled_layers

    def lm(device):  # the device is only read: nothing is allocated on it
        return SimpleNamespace(device=torch.device(device), model=torch.nn.Linear(4, 1))

    auto = steps.ComputeSettings()
    assert auto.train_compile == "auto" and auto.compile_backend() is None
    assert auto.compile_backend(lm("cpu")) is None
    monkeypatch.setattr(compiled_layers, "can_build_triton_kernels", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert auto.compile_backend(lm("cuda")) == "inductor"
    assert steps.ComputeSettings(train_compile=" ").compile_backend(lm("cuda")) == "inductor"  # empty = unset = auto
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))  # no Triton below sm70
    assert auto.compile_backend(lm("cuda")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(compiled_layers, "can_build_triton_kernels", lambda: False)  # no C compiler or Python.h: eager
    assert auto.compile_backend(lm("cuda")) is None
    monkeypatch.setattr(compiled_layers, "can_build_triton_kernels", lambda: True)
    monkeypatch.setattr(compiled_layers, "parameter_count", lambda model: compiled_layers.AUTO_MAX_PARAMETERS)
    assert auto.compile_backend(lm("cuda")) is None  # a 7B model stays eager
    assert steps.ComputeSettings(train_compile="off").compile_backend(lm("cuda")) is None
    assert steps.ComputeSettings(train_compile="Inductor").compile_backend() == "inductor"
    with pytest.raises(steps.StepError, match="train_compile: 'turbo'; expected auto, off or inductor"):
        steps.ComputeSettings(train_compile="turbo").compile_backend()
