"""Tier 3: the asset graph through Dagster (`materialize`) with the tiny protocol on CPU."""
from __future__ import annotations

import json

import pytest
from dagster import DagsterInstance, MultiPartitionKey, materialize

from zlt_dagster import steps
from zlt_dagster.steps import layout
from zlt_dagster.defs.assets import ALL_ASSETS, CELL_ASSETS, compiled_results, heatmap, onpolicy_data
from zlt_dagster.defs.partitions import cell_of, partition_keys_for, split_partition_key

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def run(assets, key, instance: DagsterInstance, resources):
    res = materialize(ALL_ASSETS, selection=assets, partition_key=key, instance=instance, resources=resources,
                      run_config=QUIET)
    assert res.success
    return {e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
            for e in res.get_asset_materialization_events()}


def test_definitions_load_and_validate():
    from dagster import Definitions

    from zlt_dagster.defs.definitions import defs

    Definitions.validate_loadable(defs)
    graph = defs.get_repository_def().asset_graph
    names = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"onpolicy_data", "adapter", "completions", "marker_rates", "arc_scores", "compiled_results",
            "heatmap"} <= names


def test_one_partition_writes_exactly_that_cell(dagster_instance, resources, register):
    sweep = register(source_persona="villain")
    store = resources["store"].get_store()
    run([onpolicy_data], sweep.sweep_id, dagster_instance, resources)
    key = partition_keys_for(sweep)[7]
    meta = run(CELL_ASSETS, key, dagster_instance, resources)
    cell = cell_of(sweep, split_partition_key(key)[1])
    # metadata a user sees in the UI
    assert meta["adapter"]["cell"].value == cell.key
    assert meta["adapter"]["tokens"].value > 0 and meta["adapter"]["tokens_per_s"].value > 0
    assert 0.0 <= meta["marker_rates"]["source_adoption"].value <= 1.0
    assert "regime" in meta["marker_rates"]
    cell_dirs = {k.split("/")[3] for k in store.list_keys(f"{layout.sweep_prefix(sweep.sweep_id)}/cells")}
    assert cell_dirs == {cell.key}, f"materializing one partition wrote other cells: {cell_dirs}"
    for artifact in layout.CELL_ARTIFACTS:
        assert store.artifact_exists(layout.cell_prefix(sweep.sweep_id, cell, artifact))
    # every artifact carries the config that produced it
    stored = json.loads(store.read_artifact_file(layout.cell_prefix(sweep.sweep_id, cell, "adapter"), "sweep.json"))
    assert stored["protocol"]["name"] == "tiny" and stored["source_persona"] == "villain"
    # the Dagster instance knows exactly one materialized partition of `adapter`
    from dagster import AssetKey
    mats = dagster_instance.get_materialized_partitions(AssetKey("adapter"))
    assert mats == {key}


def test_backfill_25_cells_then_compile_and_heatmap(dagster_instance, resources, register):
    sweep = register(source_persona="villain")
    store = resources["store"].get_store()
    run([onpolicy_data], sweep.sweep_id, dagster_instance, resources)
    # compile before any cell: every cell listed missing, none invented
    meta = run([compiled_results], sweep.sweep_id, dagster_instance, resources)
    assert meta["compiled_results"]["n_cells"].value == 0
    keys = partition_keys_for(sweep)
    assert len(keys) == 25 and len({str(k) for k in keys}) == 25
    for key in keys:
        run(CELL_ASSETS, key, dagster_instance, resources)
    meta = run([compiled_results, heatmap], sweep.sweep_id, dagster_instance, resources)
    assert meta["compiled_results"]["n_cells"].value == 25
    assert meta["compiled_results"]["missing_cells"].value == []
    assert meta["heatmap"]["heatmap"].value.startswith("![heatmap](data:image/png;base64,")
    compiled = json.loads(store.read_artifact_file(layout.compiled_prefix(sweep.sweep_id), "compiled_results.json"))
    assert len(compiled["cells"]) == 25 and compiled["missing_cells"] == []
    for rec in compiled["cells"].values():
        assert rec["arc"]["n"] > 0 and rec["regime"] and rec["headline"]["source_adoption"] is not None
        assert rec["train"]["steps"] > 0 and rec["train"]["wall_seconds"] > 0
    png = store.read_artifact_file(layout.heatmap_prefix(sweep.sweep_id), "heatmap.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert store.read_artifact_file(layout.heatmap_prefix(sweep.sweep_id), "heatmap.pdf")[:4] == b"%PDF"


def test_two_sweeps_do_not_overwrite_each_other(dagster_instance, resources, register):
    a = register(source_persona="villain")
    b = register(source_persona="comedian")
    assert a.sweep_id != b.sweep_id
    store = resources["store"].get_store()
    for sweep in (a, b):
        run([onpolicy_data], sweep.sweep_id, dagster_instance, resources)
        run(CELL_ASSETS, partition_keys_for(sweep)[0], dagster_instance, resources)
    data = {s.sweep_id: store.read_artifact_file(layout.onpolicy_prefix(s.sweep_id), "data.jsonl") for s in (a, b)}
    assert data[a.sweep_id] != data[b.sweep_id]
    pos = {sid: {json.loads(line)["persona"] for line in d.decode().splitlines() if json.loads(line)["is_positive"]}
           for sid, d in data.items()}
    assert pos == {a.sweep_id: {"villain"}, b.sweep_id: {"comedian"}}
    cell = a.cells()[0]
    ma = store.read_manifest(layout.cell_prefix(a.sweep_id, cell, "adapter"))
    mb = store.read_manifest(layout.cell_prefix(b.sweep_id, cell, "adapter"))
    assert ma["files"]["adapter_model.safetensors"]["sha256"] != mb["files"]["adapter_model.safetensors"]["sha256"]


def test_rematerializing_a_cell_is_idempotent(dagster_instance, resources, register):
    sweep = register(source_persona="villain")
    store = resources["store"].get_store()
    run([onpolicy_data], sweep.sweep_id, dagster_instance, resources)
    key = partition_keys_for(sweep)[3]
    cell = cell_of(sweep, split_partition_key(key)[1])
    run(CELL_ASSETS, key, dagster_instance, resources)
    prefix = layout.cell_prefix(sweep.sweep_id, cell, "adapter")
    first_keys = store.list_keys(layout.sweep_prefix(sweep.sweep_id))
    first = store.read_manifest(prefix)["files"]
    rates_first = store.read_artifact_file(layout.cell_prefix(sweep.sweep_id, cell, "marker_rates"),
                                           "marker_rates.json")
    run(CELL_ASSETS, key, dagster_instance, resources)
    assert store.list_keys(layout.sweep_prefix(sweep.sweep_id)) == first_keys  # same keys, nothing stale
    assert store.read_manifest(prefix)["files"]["adapter_model.safetensors"] == first["adapter_model.safetensors"]
    assert store.read_artifact_file(layout.cell_prefix(sweep.sweep_id, cell, "marker_rates"),
                                    "marker_rates.json") == rates_first


def test_partition_keys_use_dimensions_not_strings(register):
    sweep = register(source_persona="villain")
    key = partition_keys_for(sweep)[-1]
    assert isinstance(key, MultiPartitionKey)
    sweep_id, cell_key = split_partition_key(key)
    lr = sweep.protocol.learning_rates[-1]
    assert sweep_id == sweep.sweep_id and cell_key == f"lr={lr!r}_ep=5" == "lr=0.1_ep=5"  # readable: lr, epochs
    assert cell_of(sweep, cell_key) == sweep.cells()[-1]  # decoded through the sweep's grid, not by parsing


def test_bad_partition_fails_without_retry(dagster_instance, resources, register):
    """A cell outside the sweep's chosen cells is bad input: one clear failure, no retries, nothing written."""
    sweep = register(source_persona="villain", cells_subset=((1e-3, 1),))
    store = resources["store"].get_store()
    run([onpolicy_data], sweep.sweep_id, dagster_instance, resources)
    dagster_instance.add_dynamic_partitions("cells", ["lr=0.003_ep=2"])  # a cell of another sweep of the grid
    bad = MultiPartitionKey({"sweep": sweep.sweep_id, "cell": "lr=0.003_ep=2"})
    res = materialize(ALL_ASSETS, selection=CELL_ASSETS, partition_key=bad, instance=dagster_instance,
                      resources=resources, raise_on_error=False, run_config=QUIET)
    assert not res.success
    failures = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures and "not one of sweep" in str(failures[0].event_specific_data.error.message)
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in res.all_events)
    assert not store.list_keys(f"{layout.sweep_prefix(sweep.sweep_id)}/cells")


def test_unregistered_sweep_is_a_clear_error(dagster_instance, resources):
    dagster_instance.add_dynamic_partitions("sweeps", ["nope"])
    res = materialize(ALL_ASSETS, selection=[onpolicy_data], partition_key="nope", instance=dagster_instance,
                      resources=resources, raise_on_error=False, run_config=QUIET)
    assert not res.success
    msg = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"][0].event_specific_data.error.message
    assert "not registered" in msg


def test_steps_cells_done_counts(register, resources, dagster_instance):
    sweep = register(source_persona="villain")
    assert steps.cells_done(resources["store"].get_store(), sweep) == []


def test_any_grid_has_readable_partition_keys():
    """Cells are keys of a dynamic dimension: a grid of any size (here 6 LRs) gets one readable key per cell."""
    from zlt_dagster.core.protocol import TINY, Sweep, apply_overrides

    proto = apply_overrides(TINY, {"learning_rates": [1e-3 * (i + 1) for i in range(6)]}).validate()
    keys = [split_partition_key(k)[1] for k in partition_keys_for(Sweep(proto, base_model="tiny").validate())]
    assert len(keys) == 30 and keys[0] == "lr=0.001_ep=1" and keys[-1] == "lr=0.006_ep=5"
