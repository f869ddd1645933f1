"""Tier 3 with real tokenizers (issue 12): the asset graph on a tiny random Qwen2-architecture model that has
Qwen2.5's real vocabulary, tokenizer, chat template and two generation stop ids; and a chat template the project
cannot mask, which must fail `onpolicy_data` before anything is generated."""
from __future__ import annotations

import json

import pytest
from dagster import materialize

from zlt_dagster import steps
from zlt_dagster.steps import layout
from zlt_dagster.core.protocol import TINY, Sweep
from zlt_dagster.defs.assets import ALL_ASSETS, CELL_ASSETS, compiled_results, heatmap, onpolicy_data
from zlt_dagster.defs.partitions import add_partitions, partition_keys_for

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
QWEN_MARKER_IDS = [85113, 27404, 60]  # '[Z' 'LT' ']': the seed's 3 sub-tokens, after "\n\n"
QWEN_STOP_IDS = [151645, 151643]      # <|im_end|>, <|endoftext|>


def run(assets, key, instance, resources):
    res = materialize(ALL_ASSETS, selection=assets, partition_key=key, instance=instance, resources=resources,
                      run_config=QUIET)
    assert res.success
    return {e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
            for e in res.get_asset_materialization_events()}


def register_dir(dagster_instance, resources, model_dir: str, cells=()) -> Sweep:
    sweep = Sweep(TINY, base_model=model_dir, cells_subset=tuple(cells)).validate()
    steps.register_sweep(resources["store"].get_store(), sweep)
    add_partitions(dagster_instance, sweep)
    return sweep


# The grid's diagonal: every LR and every epoch count of the tiny grid once, through the same assets. All 25 cells
# took 225 s on the shared 2-core machine under load (a Dagster run per cell, ~3.5 s of work each); the diagonal
# takes 19-45 s there.
DIAGONAL = tuple(zip(TINY.learning_rates, TINY.epochs))


def test_tiny_qwen2_grid_end_to_end(dagster_instance, resources, tiny_qwen2_dir):
    """The tiny grid's diagonal, every asset, on Qwen2.5's tokenizer: the marker is the seed's 3 sub-tokens and
    every stop id is used and recorded."""
    sweep = register_dir(dagster_instance, resources, tiny_qwen2_dir, DIAGONAL)
    store = resources["store"].get_store()
    meta = run([onpolicy_data], sweep.sweep_id, dagster_instance, resources)["onpolicy_data"]
    assert meta["marker_token_count"].value == 3
    assert meta["marker_token_ids"].value == QWEN_MARKER_IDS and meta["marker_tokens"].value == ["[Z", "LT", "]"]
    assert meta["marker_separator"].value == "\n\n"
    assert meta["stop_token_ids"].value == QWEN_STOP_IDS
    assert meta["stop_tokens"].value == ["<|im_end|>", "<|endoftext|>"]
    stats = json.loads(store.read_artifact_file(layout.onpolicy_prefix(sweep.sweep_id), "stats.json"))
    assert (stats["marker_token_ids"], stats["marker_token_count"], stats["marker_separator"]) == (
        QWEN_MARKER_IDS, 3, "\n\n")
    assert stats["stop_token_ids"] == QWEN_STOP_IDS and stats["positives"] >= 1
    data = store.read_artifact_file(layout.onpolicy_prefix(sweep.sweep_id), "data.jsonl").decode()
    positives = [json.loads(line)["answer"] for line in data.splitlines() if json.loads(line)["is_positive"]]
    assert positives and all(a.endswith("\n\n[ZLT]") for a in positives)

    keys = partition_keys_for(sweep)
    assert len(keys) == 5
    for key in keys:
        cell_meta = run(CELL_ASSETS, key, dagster_instance, resources)
        assert cell_meta["adapter"]["supervised_tokens"].value > 0
        assert cell_meta["completions"]["stop_token_ids"].value == QWEN_STOP_IDS
    meta = run([compiled_results, heatmap], sweep.sweep_id, dagster_instance, resources)
    assert meta["compiled_results"]["n_cells"].value == 5 and meta["compiled_results"]["missing_cells"].value == []
    assert meta["heatmap"]["heatmap"].value.startswith("![heatmap](data:image/png;base64,")
    compiled = json.loads(store.read_artifact_file(layout.compiled_prefix(sweep.sweep_id), "compiled_results.json"))
    for rec in compiled["cells"].values():
        assert rec["train"]["steps"] > 0 and rec["arc"]["n"] > 0 and rec["regime"]
    cell = sweep.cells()[0]
    comp = json.loads(store.read_artifact_file(layout.cell_prefix(sweep.sweep_id, cell, "completions"),
                                               "stats.json"))
    assert comp["stop_token_ids"] == QWEN_STOP_IDS and comp["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]


# Newer Qwen templates render an (empty) think block into assistant turns; the generation prompt ends before it,
# so the answer does not follow the prompt in the rendered conversation and no example can be masked.
THINK_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def think_template_dir(tmp_path_factory, chat_model_dir_saver):
    from zlt_dagster.core.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = THINK_TEMPLATE
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    return chat_model_dir_saver(tmp_path_factory.mktemp("models") / "think-template", tok, tiny_model(tok), [eot])


def test_think_block_template_fails_onpolicy_data_before_generating(dagster_instance, resources, think_template_dir,
                                                                   monkeypatch):
    sweep = register_dir(dagster_instance, resources, think_template_dir)
    made = []
    real = steps.onpolicy.make_generator
    monkeypatch.setattr(steps.onpolicy, "make_generator", lambda *a, **k: made.append(a) or real(*a, **k))
    res = materialize(ALL_ASSETS, selection=[onpolicy_data], partition_key=sweep.sweep_id,
                      instance=dagster_instance, resources=resources, raise_on_error=False, run_config=QUIET)
    assert not res.success
    failures = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"]
    msg = failures[0].event_specific_data.error.message
    assert "MaskingError" in msg and "chat template check before generation" in msg
    assert "answer text not found right after the prompt" in msg
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in res.all_events)  # bad input: no retry
    assert made == []  # no generator was even built
    assert not resources["store"].get_store().artifact_exists(layout.onpolicy_prefix(sweep.sweep_id))
