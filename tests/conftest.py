"""Shared fixtures: the tiny random chat model (tiny Llama + BPE tokenizer with a ChatML template).

Loading it takes ~0.1 s once torch/transformers are imported, so each test module gets its own copy
(module scope): a test that breaks the shared base cannot leak into another module."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_loaded():
    from zlt_dagster.core.models import load_model

    return load_model("tiny", device="cpu")


def base_state(model) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor of the model's state dict (for bit-exact before/after comparisons)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_base_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before), f"state dict keys changed: {sorted(set(after) ^ set(before))[:5]}"
    for k, v in before.items():
        assert torch.equal(after[k], v), f"base weight {k} changed"
    lora = [n for n, _ in model.named_modules() if "lora" in n.lower()]
    assert not lora, f"LoRA modules left on the shared base: {lora[:3]}"
    assert not hasattr(model, "peft_config"), "peft_config left on the shared base"


@pytest.fixture
def base_guard():
    """Helpers as a fixture so test modules need not import conftest."""
    return base_state, assert_base_unchanged


def save_random_adapter(model, out_dir) -> str:
    """A PEFT adapter of the tiny protocol's LoRA shape with large random B (N(0, 0.5)), so it visibly changes
    `model`'s outputs; the model itself is left as it was."""
    from zlt_dagster.core.protocol import TINY
    from zlt_dagster.core.random_adapter import save_random_adapter as save
    from zlt_dagster.core.lora_bank import lora_config

    return save(model, lora_config(TINY), out_dir, b_std=0.5)


@pytest.fixture(scope="session")
def adapter_saver():
    """`save_random_adapter` as a fixture: with several conftest.py files, `from conftest import ...` resolves to
    whichever conftest pytest imported first under that name, so test modules must not import it."""
    return save_random_adapter


# --- loopback S3 (storage contract and reliability tests) ------------------------------------------------------
@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Dummy credentials from the environment only (loopback.ACCESS_KEY / SECRET_KEY)."""
    from loopback import FOREIGN_AWS_VARS, isolated_aws_env

    for var in FOREIGN_AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    for k, v in isolated_aws_env(tmp_path).items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="session")
def s3_server_url():
    """One moto S3 server on 127.0.0.1 for the session; tests isolate themselves by bucket prefix."""
    from loopback import moto_s3_server

    with moto_s3_server() as url:
        yield url
