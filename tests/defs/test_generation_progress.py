"""Issue 17, item 4: the long generation steps (on-policy data, completions, ARC) log progress while they run, in
Dagster's log and so on the `zlt run` console, and their final figures (tokens, tokens/s, the batch size used and
how it was chosen) land in stats.json and the materialization metadata. Tiny model and protocol, CPU; interval 0
(a line at every report) where the lines during the run are checked, so nothing depends on timing."""
from __future__ import annotations

import json
import re

import pytest
from dagster import materialize

from zlt_dagster import steps
from zlt_dagster.core.protocol import Sweep, get_protocol
from zlt_dagster.defs.assets import (ALL_ASSETS, ARC_KEYS, COMPLETIONS_KEYS, ONPOLICY_KEYS, arc_scores, completions,
                                     onpolicy_data)
from zlt_dagster.defs.metadata import to_result
from zlt_dagster.defs.partitions import add_partitions, partition_key
from zlt_dagster.steps import layout
from zlt_dagster.storage import LocalStore

# several batches per step, so that progress shows between them: 14 on-policy answers in batches of 4, 22
# completions in batches of 8, 4 ARC questions' continuations in batches of 5
PROTOCOL = get_protocol("tiny", {"data.gen_batch_size": 4, "eval.gen_batch_size": 8, "eval.arc_batch_size": 5})
DURING = r"{label}: (\d+)/{total} {unit}, ([\d,]+) tokens {verb}, [\d,]+ tok/s, \d+ s elapsed, ETA (\d+ s|\?)$"


def commit_random_adapter(store, sweep, cell, model, tmp_path, adapter_saver):
    """The cell's adapter artifact as the adapter step commits it (files + manifest), without training."""
    path = adapter_saver(model, tmp_path / "adapter")
    files = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir() if p.is_file()}
    store.commit_bytes_artifact(layout.cell_prefix(sweep.sweep_id, cell, "adapter"), files)
    return path


def during(lines, label, total, unit="sequences", verb="generated") -> list[tuple[int, int]]:
    """(done, tokens) of every progress line of `label` written while it ran."""
    pattern = re.compile(DURING.format(label=re.escape(label), total=total, unit=unit, verb=verb))
    return [(int(m[1]), int(m[2].replace(",", ""))) for m in map(pattern.match, lines) if m]


@pytest.fixture
def setup(tmp_path, tiny_loaded, adapter_saver):
    store = LocalStore(str(tmp_path / "art"))
    sweep = Sweep(PROTOCOL, base_model="tiny", cells_subset=((1e-3, 1),)).validate()
    steps.register_sweep(store, sweep)
    cell = sweep.cells()[0]
    commit_random_adapter(store, sweep, cell, tiny_loaded.model, tmp_path, adapter_saver)
    return store, sweep, cell


def test_steps_log_progress_while_they_run_and_store_the_figures(setup):
    store, sweep, cell = setup
    compute = steps.ComputeSettings(device="cpu", arc_source="sample", progress_interval_s=0)

    lines: list[str] = []
    s = steps.run_onpolicy(store, sweep, compute, log=lines.append)
    first = s["generation_passes"][0]
    assert "on-policy data: 14 sequences, batch 4 (protocol)" in lines
    seen = during(lines, "on-policy data", 14)
    assert [d for d, _ in seen] == [4, 8, 12, 14]  # after every batch
    assert seen[-1][1] == first["tokens"] and [t for _, t in seen] == sorted(t for _, t in seen)
    assert any(line.startswith(f"on-policy data: done, 14 sequences, {first['tokens']:,} tokens generated in")
               for line in lines)
    stored = json.loads(store.read_artifact_file(layout.onpolicy_prefix(sweep.sweep_id), "stats.json"))
    assert stored["new_tokens"] == sum(p["tokens"] for p in stored["generation_passes"]) > 0
    assert (stored["gen_batch_size"], stored["gen_batch_size_source"]) == (4, "protocol")
    assert stored["tokens_per_s"] > 0 and stored["generation_passes"][0]["sequences"] == 14
    meta = to_result(s, ONPOLICY_KEYS, sweep=sweep).metadata
    assert meta["new_tokens"] == stored["new_tokens"] and meta["gen_batch_size"] == 4
    assert meta["generation_passes"].data == stored["generation_passes"]  # JSON in the UI

    lines.clear()
    s = steps.run_completions(store, sweep, cell, compute, log=lines.append)
    label = f"completions {cell.key}"
    assert f"{label}: 22 sequences, batch 8 (protocol)" in lines
    seen = during(lines, label, 22)
    assert [d for d, _ in seen] == [8, 16, 22] and seen[-1][1] == s["new_tokens"]
    assert any(line.startswith(f"{label}: done, 22 sequences, {s['new_tokens']:,} tokens generated") for line in lines)
    stored = json.loads(store.read_artifact_file(layout.cell_prefix(sweep.sweep_id, cell, "completions"),
                                                 "stats.json"))
    assert (stored["gen_batch_size"], stored["gen_batch_size_source"]) == (8, "protocol")
    meta = to_result(s, COMPLETIONS_KEYS, sweep=sweep, cell=cell).metadata
    assert (meta["gen_batch_size"], meta["gen_batch_size_source"]) == (8, "protocol") and meta["tokens_per_s"] > 0

    lines.clear()
    s = steps.run_arc(store, sweep, cell, compute, log=lines.append)
    seen = during(lines, f"ARC {cell.key}", s["n_sequences"], unit="continuations", verb="read")
    assert [d for d, _ in seen][-1] == s["n_sequences"] and len(seen) >= 3
    assert (s["arc_batch_size"], s["arc_batch_size_source"]) == (5, "protocol") and s["continuations_per_s"] > 0
    assert to_result(s, ARC_KEYS, sweep=sweep, cell=cell).metadata["arc_batch_size"] == 5


def test_the_assets_log_progress_to_dagster_and_show_the_figures(setup, dagster_instance):
    """Through Dagster (what `zlt run` and the UI run): the lines reach context.log (the event log, which the
    `zlt run` console prints at INFO), the figures the materialization's metadata."""
    from zlt_dagster.defs.resources import ArtifactStore, Compute

    store, sweep, cell = setup
    add_partitions(dagster_instance, sweep)
    resources = {"store": ArtifactStore(kind="local", local_root=str(store.root)),
                 "compute": Compute(device="cpu", arc_source="sample")}
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    runs = {}
    for asset, key in ((onpolicy_data, sweep.sweep_id), (completions, partition_key(sweep, cell)),
                       (arc_scores, partition_key(sweep, cell))):
        res = materialize(ALL_ASSETS, selection=[asset], partition_key=key, instance=dagster_instance,
                          resources=resources, run_config=quiet)
        assert res.success
        meta = res.get_asset_materialization_events()[0].step_materialization_data.materialization.metadata
        logged = [e.user_message for e in dagster_instance.all_logs(res.run_id)]
        runs[asset.key.to_user_string()] = meta, logged
    meta, logged = runs["onpolicy_data"]
    assert "on-policy data: 14 sequences, batch 4 (protocol)" in logged
    assert any(m.startswith("on-policy data: done, 14 sequences") for m in logged)
    assert meta["new_tokens"].value > 0 and meta["gen_batch_size"].value == 4
    assert meta["gen_batch_size_source"].value == "protocol"
    meta, logged = runs["completions"]
    assert any(m.startswith(f"completions {cell.key}: done, 22 sequences") for m in logged)
    assert meta["gen_batch_size"].value == 8 and meta["new_tokens"].value > 0
    meta, logged = runs["arc_scores"]
    assert any(m.startswith(f"ARC {cell.key}: done") for m in logged)
    assert meta["arc_batch_size"].value == 5 and meta["continuations_per_s"].value > 0
