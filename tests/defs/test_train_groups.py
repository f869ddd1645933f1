"""Grouped training through Dagster: the `adapter` asset's BackfillPolicy on this Dagster version (1.13.27), a
range run of many partitions trained in one pass with one artifact and one materialization per partition, and
the runner's grouping of partition keys."""
from __future__ import annotations

import json

import pytest
from dagster import AssetKey, materialize

from zlt_dagster.steps import layout
from zlt_dagster.defs.assets import ALL_ASSETS, TRAIN_GROUP_SIZE, adapter, onpolicy_data
from zlt_dagster.defs.partitions import cell_of, partition_keys_for, split_partition_key
from zlt_dagster.defs.runner import contiguous_groups

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def backfill_runs(instance, keys):
    """The runs Dagster's own backfill logic makes of `adapter` partitions (what the daemon and UI use)."""
    from dagster._core.definitions.automation_tick_evaluation_context import (
        build_run_requests_with_backfill_policies,
    )
    from dagster._core.definitions.events import AssetKeyPartitionKey
    from dagster._core.definitions.partitions.context import partition_loading_context

    from zlt_dagster.defs.definitions import build_definitions

    graph = build_definitions("local").resolve_asset_graph()
    with partition_loading_context(dynamic_partitions_store=instance):
        reqs = build_run_requests_with_backfill_policies(
            [AssetKeyPartitionKey(AssetKey("adapter"), k) for k in keys], graph, instance)
    return [(r.tags.get("dagster/asset_partition_range_start"), r.tags.get("dagster/asset_partition_range_end"))
            for r in reqs]


def test_backfill_policy_groups_a_whole_sweep_into_one_run(dagster_instance, register):
    assert TRAIN_GROUP_SIZE == 25  # the default: a whole 5 x 5 grid per run
    a, b = register(source_persona="villain"), register(source_persona="librarian")
    keys_a, keys_b = partition_keys_for(a), partition_keys_for(b)
    # the whole grid of one sweep (with another sweep registered): one run over exactly its 25 partitions
    assert backfill_runs(dagster_instance, keys_a) == [(str(keys_a[0]), str(keys_a[-1]))]
    # two whole sweeps: one run each (a range never mixes sweeps)
    assert sorted(backfill_runs(dagster_instance, keys_a + keys_b)) == sorted(
        [(str(keys_a[0]), str(keys_a[-1])), (str(keys_b[0]), str(keys_b[-1]))])
    # a contiguous stretch in the cell order: one run
    assert backfill_runs(dagster_instance, keys_a[3:10]) == [(str(keys_a[3]), str(keys_a[9]))]
    # dagster-io/dagster#18852 on this version: a selection with gaps (one epochs column) is one run per
    # contiguous stretch, here one per partition; each run is still the right partition (never a wrong set)
    column = [k for k in keys_a if split_partition_key(k)[1].endswith("_ep2")]
    assert sorted(backfill_runs(dagster_instance, column)) == sorted((str(k), str(k)) for k in column)


def test_a_range_run_trains_every_partition_with_its_own_artifact(dagster_instance, resources, register):
    sweep = register(source_persona="villain")
    store = resources["store"].get_store()
    assert materialize(ALL_ASSETS, selection=[onpolicy_data], partition_key=sweep.sweep_id,
                       instance=dagster_instance, resources=resources, run_config=QUIET).success
    keys = partition_keys_for(sweep)[:7]  # lr=0.001_ep=1 .. lr=0.003_ep=2: two LRs, all five epochs values
    res = materialize(ALL_ASSETS, selection=[adapter], instance=dagster_instance, resources=resources,
                      run_config=QUIET, tags={"dagster/asset_partition_range_start": str(keys[0]),
                                              "dagster/asset_partition_range_end": str(keys[-1])})
    assert res.success
    events = res.get_asset_materialization_events()
    assert sorted(str(e.partition) for e in events) == sorted(str(k) for k in keys)  # one per partition
    assert dagster_instance.get_materialized_partitions(AssetKey("adapter")) == {str(k) for k in keys}
    for e in events:
        cell = cell_of(sweep, split_partition_key(e.partition)[1])
        meta = e.step_materialization_data.materialization.metadata
        assert meta["cell"].value == cell.key and meta["epochs"].value == cell.epochs  # its own numbers
        assert meta["group"].value["n_cells"] == 7
        record = json.loads(store.read_artifact_file(layout.cell_prefix(sweep.sweep_id, cell, "adapter"),
                                                     "train_run.json"))
        assert record["cell"]["key"] == cell.key and record["group"]["n_cells"] == 7
        assert meta["steps"].value == record["steps"] == record["steps_per_epoch"] * cell.epochs
        assert meta["final_loss"].value == record["final_loss"]
    # nothing else was trained
    trained = {k.split("/")[3] for k in store.list_keys(f"{layout.sweep_prefix(sweep.sweep_id)}/cells")}
    assert trained == {cell_of(sweep, split_partition_key(k)[1]).key for k in keys}


@pytest.mark.parametrize("size,expect", [(25, [[0, 1, 2], [4], [6, 7]]), (2, [[0, 1], [2], [4], [6, 7]])])
def test_contiguous_groups_follow_the_partition_order(size, expect):
    ordered = [f"k{i}" for i in range(10)]
    picked = ["k7", "k0", "k2", "k1", "k4", "k6"]
    assert contiguous_groups(picked, ordered, size) == [[f"k{i}" for i in g] for g in expect]


def test_zlt_run_records_adapters_an_interrupted_pass_committed(tmp_path, monkeypatch, capsys):
    """A pass killed after its 1-epoch cell was committed: Dagster never recorded that materialization (a run
    records them when it ends). `zlt run` reports it to the instance from the committed run record, does not train
    the cell again, and evaluates it."""
    from dagster import DagsterInstance

    from zlt_dagster import steps
    from zlt_dagster.cli import main
    from zlt_dagster.core.sweep_file import load_sweep_file
    from zlt_dagster.storage import LocalStore

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZLT_ARC_SOURCE", "sample")
    monkeypatch.setenv("ZLT_DEVICE", "cpu")
    art = tmp_path / "art"
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("protocol: tiny\nbase_model: tiny\nseed: 3\ncells: [[1.0e-3, 1], [1.0e-3, 2]]\n")
    sweep = load_sweep_file(cfg)
    store = LocalStore(str(art))
    compute = steps.ComputeSettings(device="cpu")
    steps.register_sweep(store, sweep)
    steps.run_onpolicy(store, sweep, compute, log=lambda _m: None)
    first = sweep.cells()[0]
    steps.run_adapters(store, sweep, [first], compute, log=lambda _m: None)  # "the killed pass"
    manifest = store.get_bytes(f"{layout.cell_prefix(sweep.sweep_id, first, 'adapter')}/MANIFEST.json")
    assert main(["--artifacts", str(art), "run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "2 to run (1 to train)" in out and "recorded in the instance" in out
    assert store.get_bytes(f"{layout.cell_prefix(sweep.sweep_id, first, 'adapter')}/MANIFEST.json") == manifest
    with DagsterInstance.get() as instance:
        assert len(instance.get_materialized_partitions(AssetKey("adapter"))) == 2
        assert len(instance.get_materialized_partitions(AssetKey("marker_rates"))) == 2


@pytest.mark.parametrize("bad", ["0", "-3", "abc"])
def test_a_bad_train_group_size_is_a_one_line_config_error(bad, tmp_path, monkeypatch, capsys):
    from zlt_dagster.cli import main

    monkeypatch.setenv("ZLT_TRAIN_GROUP_SIZE", bad)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("protocol: tiny\nbase_model: tiny\n")
    assert main(["--artifacts", str(tmp_path / "art"), "run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zlt: error: environment: ZLT_TRAIN_GROUP_SIZE:")
    assert not (tmp_path / "art").exists() and not (tmp_path / "home").exists()


def test_a_range_with_cells_outside_a_subset_sweep_fails_before_training(dagster_instance, resources, register):
    register(source_persona="librarian")  # a whole grid first: the cells dimension holds all 25, in grid order
    sweep = register(source_persona="villain", cells_subset=((1e-3, 1), (1e-3, 3)))
    store = resources["store"].get_store()
    assert materialize(ALL_ASSETS, selection=[onpolicy_data], partition_key=sweep.sweep_id,
                       instance=dagster_instance, resources=resources, run_config=QUIET).success
    keys = partition_keys_for(sweep)  # lr=0.001_ep=1 and _ep=3: the range between them holds lr=0.001_ep=2 too
    res = materialize(ALL_ASSETS, selection=[adapter], instance=dagster_instance, resources=resources,
                      run_config=QUIET, raise_on_error=False,
                      tags={"dagster/asset_partition_range_start": str(keys[0]),
                            "dagster/asset_partition_range_end": str(keys[-1])})
    assert not res.success
    failure = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert "lr=0.001_ep=2" in failure.event_specific_data.error.message
    assert not store.list_keys(f"{layout.sweep_prefix(sweep.sweep_id)}/cells")  # nothing trained
