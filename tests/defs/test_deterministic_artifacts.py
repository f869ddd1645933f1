"""Re-materializing a cell gives byte-identical artifacts: `zlt run`, then `zlt run --force` in a new process with
another hash seed (peft writes its module sets in hash order) over the same store.

Byte-identical: every result file (adapter weights and config, completions, marker rates, heatmap PNG and PDF,
sweep.json, on-policy data). The run records also hold what was measured, which no rerun reproduces: times and
throughputs, the free memory the micro-batch plan saw, and a manifest's creation time (and the checksums of the
files holding those). Those files must be equal once exactly MEASURED is removed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MEASURED = {"wall_s", "gpu_s", "tokens_per_s", "continuations_per_s", "budget_bytes", "created_at", "wall_seconds",
            "gpu_seconds", "compile_s"}
MUST_BE_IDENTICAL = {"adapter_config.json", "adapter_model.safetensors", "completions.jsonl", "marker_rates.json",
                     "heatmap.png", "heatmap.pdf", "sweep.json", "data.jsonl"}


def _zlt(tmp: Path, hash_seed: str, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "ZLT_"))}
    env.update(DAGSTER_HOME=str(tmp / "home"), ZLT_ARC_SOURCE="sample", ZLT_DEVICE="cpu", ZLT_TORCH_THREADS="1",
               PYTHONHASHSEED=hash_seed)
    subprocess.run([sys.executable, "-m", "zlt_dagster.cli", "--artifacts", str(tmp / "art"), "run",
                    str(tmp / "sweep.yaml"), *args], env=env, check=True, capture_output=True, timeout=600)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _without_measured(value):
    if isinstance(value, dict):
        return {k: _without_measured(v) for k, v in value.items() if k not in MEASURED}
    if isinstance(value, list):
        return [_without_measured(v) for v in value]
    return value


def test_rematerializing_a_cell_is_byte_identical(tmp_path):
    (tmp_path / "sweep.yaml").write_text("protocol: tiny\nbase_model: tiny\nsource_persona: comedian\nseed: 7\n"
                                         "cells: [[1.0e-3, 1]]\n")
    _zlt(tmp_path, "1")
    first = _snapshot(tmp_path / "art")
    _zlt(tmp_path, "2", "--force")
    second = _snapshot(tmp_path / "art")
    assert set(first) == set(second)
    names = {Path(k).name for k in first}
    assert MUST_BE_IDENTICAL <= names, MUST_BE_IDENTICAL - names
    differ = sorted(k for k in first if first[k] != second[k])
    assert any(k.endswith("adapter/MANIFEST.json") for k in differ), "the second run did not re-materialize"
    assert not [k for k in differ if Path(k).name in MUST_BE_IDENTICAL], differ
    for key in differ:  # run records: only measured values may differ
        a, b = json.loads(first[key]), json.loads(second[key])
        if Path(key).name == "MANIFEST.json":  # checksums of byte-identical files must agree too
            prefix = str(Path(key).parent)
            same = {f for f in a["files"] if first[f"{prefix}/{f}"] == second[f"{prefix}/{f}"]}
            a["files"] = {f: v for f, v in a["files"].items() if f in same}
            b["files"] = {f: v for f, v in b["files"].items() if f in same}
        assert _without_measured(a) == _without_measured(b), key
    config = json.loads(next(v for k, v in second.items() if k.endswith("adapter_config.json")))
    assert config["target_modules"] == sorted(config["target_modules"]) and len(config["target_modules"]) > 1
