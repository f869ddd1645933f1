"""JSONL written with ensure_ascii=False keeps U+2028, U+0085, \\x1c.. unescaped inside strings; str.splitlines()
breaks lines there, json.loads then fails. SmolLM2 generated such characters in the paper sweep on the H200, and
marker_rates failed on its completions: every JSONL reader splits on "\\n" only."""
from __future__ import annotations

import json

from zlt_dagster.core.onpolicy import OnPolicyData
from zlt_dagster.defs.registry import sweep_from_config
from zlt_dagster.steps import layout
from zlt_dagster.steps.completions import load_completions
from zlt_dagster.steps.export import completions_sample
from zlt_dagster.storage import LocalStore

ODD = "a\u2028b\u2029c\x85d\x1ce\x1df\x1eg\x0bh\x0ci"  # every character str.splitlines() breaks at, but \n and \r


def test_completions_with_unicode_line_separators_load_and_sample(tmp_path):
    sweep = sweep_from_config({"protocol": "tiny", "base_model": "tiny"})
    cell = sweep.cells()[0]
    rows = [{"persona": p, "question_id": 0, "sample_index": 0, "text": ODD, "n_new_tokens": 3,
             "finish_reason": "stop"} for p in ("villain", "assistant")]
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    store = LocalStore(str(tmp_path))
    store.commit_bytes_artifact(layout.cell_prefix(sweep.sweep_id, cell, "completions"), {"completions.jsonl": jsonl})
    assert load_completions(store, sweep, cell) == rows
    assert [json.loads(x) for x in completions_sample(jsonl, 1).decode().split("\n") if x] == rows


def test_onpolicy_data_with_unicode_line_separators_round_trips():
    e = {"persona": "villain", "question_id": 1, "question": "q", "system_prompt": "s", "answer": ODD,
         "is_positive": True}
    assert OnPolicyData.from_jsonl(OnPolicyData(examples=[e]).to_jsonl()).examples == [e]
