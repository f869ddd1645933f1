"""The three user flows through a running Dagster (webserver + daemon via `dagster dev`), driven by GraphQL.

Setup: a temporary DAGSTER_HOME (SQLite, QueuedRunCoordinator, one run at a time), a temporary artifact root, the
tiny protocol (tiny random model, sample ARC), and a temporary sweep registry holding one sweep with
`schedule: data` (the sensor registers it and makes its on-policy data; the user drives the cells). That sweep is
the tiny protocol on a grid of one LR x two epochs values (protocol overrides: its sizes, not its method), so a
whole-sweep backfill is 2 partitions, trained in one grouped pass. The 25-cell grid is checked in process, below
the daemon: every cell materialized, compiled and drawn by tests/defs/test_assets.py
(test_backfill_25_cells_then_compile_and_heatmap), a whole 5 x 5 sweep grouped into one run by Dagster's own
backfill logic and a range run over two LRs and five epochs values by tests/defs/test_train_groups.py. Then:
  1. the registry sensor registers the sweep (store + dynamic partition) and runs its sweep_data_job;
  2. flow 1: one partition of cell_job launched by GraphQL `launchRun` (what the UI's Materialize does);
  3. flow 3: meanwhile, a comedian sweep (2 chosen cells, schedule full) is appended to the registry: the sensor
     launches its data, cells and report, and the villain sweep gets no run from it;
  4. flow 2: a backfill of every partition of the villain sweep, cell assets + compile + heatmap
     (`launchPartitionBackfill`), polled until it completes successfully, while the comedian's runs share the queue;
  5. two sensor ticks after the last run: both skipped, nothing requested for either sweep.
Artifacts on disk and run counts are asserted; the file tracker (with WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME set
to something else) must have put every step of a sweep into that sweep's project.
Each run is a fresh process (import torch + transformers): ~9 s a run on 2 cores, 10 runs. The backfill daemon
wakes every 30 s (fixed in dagster 1.13; it starts with the sensor, so it wakes ~30, 60, 90, ... s after the first
sensor run is created), so the backfill takes four of its iterations (adapter, the cells' evaluations, report,
completion): two evaluation runs fit in one interval, four do not. The comedian's runs (flow 3) fill those waits
instead of following them. Measured on 2 cores: 130-132 s in four runs (was ~405 s with a 25-partition backfill and
the flows one after another); a stage that misses its iteration (a slower machine, a comedian run started just
before it) adds 30 s: 162 s once, before the backfill's priority tag below.
"""
from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import yaml

from e2e_dagster import TERMINAL, Dagster, dagster_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

TINY = {"protocol": "tiny", "base_model": "tiny", "seed": 42}
# the villain sweep: the tiny protocol on a 1 x 2 grid; its cells train for different epochs in one grouped pass
GRID = {"protocol": {"base": "tiny", "learning_rates": [1e-2], "epochs": [1, 3]}}
VILLAIN = {**TINY, **GRID, "source_persona": "villain", "schedule": "data"}
COMEDIAN = {**TINY, "source_persona": "comedian", "cells": [[1e-3, 1], [3e-2, 4]]}
CELL_ASSETS = ["adapter", "completions", "marker_rates", "arc_scores"]


@pytest.fixture
def dagster(tmp_path):
    env = dagster_env(tmp_path, [VILLAIN])
    env.update(ZLT_TRACKING="file", ZLT_TRACKING_DIR=str(tmp_path / "tracking"), WANDB_PROJECT="huggingface",
               MLFLOW_EXPERIMENT_NAME="Default")
    d = Dagster(tmp_path, env)
    try:
        yield d
    finally:
        d.stop()


def test_user_flows(dagster):
    from zlt_dagster.steps import layout
    from zlt_dagster.core.sweep_file import sweep_from_dict
    from zlt_dagster.defs.partitions import partition_keys_for
    from zlt_dagster.storage import LocalStore

    t0 = time.monotonic()
    timings = {}
    d = dagster
    store = LocalStore(str(d.artifacts))
    villain = sweep_from_dict({k: v for k, v in VILLAIN.items() if k != "schedule"})
    vid = villain.sweep_id
    comedian = sweep_from_dict(COMEDIAN)
    cid = comedian.sweep_id
    location, repository = d.wait("the code location to load", d.location, 300)
    timings["startup"] = time.monotonic() - t0

    # --- the registry sensor registers the sweep and makes its on-policy data ---------------------------------
    def data_done():
        runs = [r for r in d.runs() if r["jobName"] == "sweep_data_job" and r["sweep"] == vid]
        assert all(r["status"] not in ("FAILURE", "CANCELED") for r in runs), runs
        return runs and all(r["status"] == "SUCCESS" for r in runs)
    d.wait("the sensor's sweep_data_job run", data_done, 240)
    assert store.exists(layout.sweep_config_key(vid)) and store.artifact_exists(layout.onpolicy_prefix(vid))
    [data_run] = [r for r in d.runs() if r["sweep"] == vid]
    assert data_run["tags"]["dagster/sensor_name"] == "sweep_registry_sensor"
    keys = d.gql("""{ assetNodeOrError(assetKey: {path: ["onpolicy_data"]}) { ... on AssetNode {
        partitionKeysByDimension { partitionKeys } } } }""")["assetNodeOrError"]["partitionKeysByDimension"]
    assert keys[0]["partitionKeys"] == [vid]
    timings["registered+data"] = time.monotonic() - t0

    # --- flow 3 starts: append a persona; only its sweep gets runs (checked below, once its runs are done) -------
    d.registry.write_text(yaml.safe_dump([VILLAIN, COMEDIAN]))

    # --- flow 1: one partition ---------------------------------------------------------------------------------
    key = partition_keys_for(villain)[1]  # lr=0.01_ep=3: its LR and epochs, readable
    assert key.keys_by_dimension["cell"] == "lr=0.01_ep=3"
    tags = [{"key": "dagster/partition", "value": str(key)}] + [
        {"key": f"dagster/partition/{dim}", "value": v} for dim, v in key.keys_by_dimension.items()]
    res = d.gql("""mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
        ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
        ... on RunConfigValidationInvalid { errors { message } } } }""", {"p": {
        "selector": {"repositoryLocationName": location, "repositoryName": repository, "jobName": "cell_job"},
        "runConfigData": {}, "executionMetadata": {"tags": tags}}})["launchRun"]
    assert res["__typename"] == "LaunchRunSuccess", res
    run_id = res["run"]["runId"]
    status = d.wait("the one-partition run", lambda: next(
        (r["status"] for r in d.runs() if r["runId"] == run_id and r["status"] in TERMINAL), None), 180)
    assert status == "SUCCESS"
    cell = villain.cells()[1]
    assert {k.split("/")[3] for k in store.list_keys(f"{layout.sweep_prefix(vid)}/cells")} == {cell.key}
    # the comedian is registered (its cells join the `cells` dimension) before the backfill picks its ranges
    d.wait("the sensor to register the comedian sweep", lambda: [r for r in d.runs() if r["sweep"] == cid], 60)
    timings["flow1"] = time.monotonic() - t0

    # --- flow 2: backfill every partition of the sweep, compile and heatmap -------------------------------------
    # Timing only: the backfill's runs carry dagster/priority 1 (a tag a user can give a backfill in the UI), so the
    # queue (one run at a time) starts them before the comedian's runs queued meanwhile (a run already started still
    # finishes first); without it, comedian runs queued ahead of a stage of the backfill push that stage past the
    # daemon's next iteration, +30 s each time.
    names = [str(k) for k in partition_keys_for(villain)]
    assert len(names) == 2
    res = d.gql("""mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
        __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }""", {"p": {
        "partitionNames": names, "tags": [{"key": "dagster/priority", "value": "1"}],
        "assetSelection": [{"path": [a]} for a in CELL_ASSETS + ["compiled_results", "heatmap"]]}})
    res = res["launchPartitionBackfill"]
    assert res["__typename"] == "LaunchBackfillSuccess", res
    backfill_id = res["backfillId"]

    # --- flow 3: the comedian's runs, sensor-launched, while the backfill runs ---------------------------------
    def comedian_done():
        runs = [r for r in d.runs() if r["sweep"] == cid]
        assert all(r["status"] not in ("FAILURE", "CANCELED") for r in runs), runs
        jobs = Counter(r["jobName"] for r in runs if r["status"] == "SUCCESS")
        return jobs if jobs.get("report_job") else None
    jobs = d.wait("the comedian sweep's runs", comedian_done, 400)
    assert jobs == {"sweep_data_job": 1, "cell_job": 2, "report_job": 1}
    comedian_runs = [r for r in d.runs() if r["sweep"] == cid]
    assert all(r["tags"].get("dagster/sensor_name") == "sweep_registry_sensor" for r in comedian_runs)
    assert {r["tags"]["dagster/run_key"] for r in comedian_runs} == {
        f"{cid}:sweep_data_job", f"{cid}:lr=0.001_ep=1", f"{cid}:lr=0.03_ep=4", f"{cid}:report_job"}
    compiled = json.loads(store.read_artifact_file(layout.compiled_prefix(cid), "compiled_results.json"))
    assert sorted(compiled["cells"]) == sorted(c.key for c in comedian.cells())
    assert store.artifact_exists(layout.heatmap_prefix(cid))
    timings["flow3"] = time.monotonic() - t0

    # --- flow 2 ends: its runs, then the backfill's own status ---------------------------------------------------
    # the adapter's BackfillPolicy: ONE run trains both cells in one pass (a partition range over the sweep),
    # then 2 per-cell evaluation runs (completions, marker rates, ARC) and one report run
    def backfill_runs_done():
        runs = [r for r in d.runs() if r["tags"].get("dagster/backfill") == backfill_id]
        assert all(r["status"] not in ("FAILURE", "CANCELED") for r in runs), runs
        return runs if any(r["tags"].get("dagster/partition") == vid and r["status"] == "SUCCESS" for r in runs) \
            else None  # the report run: the only one partitioned by the sweep alone, and the last
    d.wait("the backfill's report run", backfill_runs_done, 400)
    quiet_from = time.time()  # every run is done: from here on, the sensor must request nothing

    def backfill_status():
        s = d.gql("""query($id: String!) { partitionBackfillOrError(backfillId: $id) {
            ... on PartitionBackfill { status } } }""", {"id": backfill_id})["partitionBackfillOrError"]["status"]
        return s if s in ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED") else None
    assert d.wait("the backfill to complete", backfill_status, 120) in ("COMPLETED", "COMPLETED_SUCCESS")
    backfill_runs = [r for r in d.runs() if r["tags"].get("dagster/backfill") == backfill_id]
    grouped = [r for r in backfill_runs if "dagster/asset_partition_range_start" in r["tags"]]
    assert len(grouped) == 1 and grouped[0]["tags"]["dagster/asset_partition_range_start"] == names[0]
    assert grouped[0]["tags"]["dagster/asset_partition_range_end"] == names[-1]
    assert len(backfill_runs) == 1 + 2 + 1 and all(r["status"] == "SUCCESS" for r in backfill_runs)
    for c in villain.cells():
        for artifact in CELL_ASSETS:
            assert store.artifact_exists(layout.cell_prefix(vid, c, artifact)), (c.key, artifact)
    compiled = json.loads(store.read_artifact_file(layout.compiled_prefix(vid), "compiled_results.json"))
    assert len(compiled["cells"]) == 2 and compiled["missing_cells"] == []
    assert store.read_artifact_file(layout.heatmap_prefix(vid), "heatmap.png")[:8] == b"\x89PNG\r\n\x1a\n"
    timings["flow2"] = time.monotonic() - t0

    # --- two sensor ticks after the last run: both skipped, nothing requested, each sweep's state named ---------
    selector = {"repositoryLocationName": location, "repositoryName": repository,
                "sensorName": "sweep_registry_sensor"}

    def quiet_ticks():
        s = d.gql("""query($s: SensorSelector!, $after: Float) { sensorOrError(sensorSelector: $s) { ... on Sensor {
            sensorState { ticks(afterTimestamp: $after, limit: 10) { status timestamp runIds skipReason } } } } }""",
                  {"s": selector, "after": quiet_from})
        ticks = [t for t in s["sensorOrError"]["sensorState"]["ticks"] if t["status"] != "STARTED"]
        return ticks if len(ticks) >= 2 else None
    for tick in d.wait("two sensor ticks after the last run", quiet_ticks, 60):
        assert tick["status"] == "SKIPPED" and tick["runIds"] == [], tick
        assert f"{vid}: data ready" in tick["skipReason"] and f"{cid}: complete" in tick["skipReason"], tick
    all_runs = d.runs()
    villain_runs = [r for r in all_runs if r["sweep"] == vid]
    # the villain sweep (schedule: data) got one run from the sensor, its data; the rest are the user's
    assert [r["runId"] for r in villain_runs if "dagster/sensor_name" in r["tags"]] == [data_run["runId"]]
    assert len(villain_runs) == 1 + 1 + 4  # sensor's data run, flow 1, the backfill (grouped adapter run + 3)
    assert len([r for r in all_runs if r["sweep"] == cid]) == 4
    assert len(all_runs) == 6 + 4 and all(r["status"] == "SUCCESS" for r in all_runs)

    # --- tracking: every step of a sweep landed in that sweep's project, despite WANDB_PROJECT & co --------------
    projects = {p.name: p for p in (d.tmp / "tracking").iterdir()}
    assert set(projects) == {f"zlt-{vid}", f"zlt-{cid}"}
    adapters = [p for p in projects[f"zlt-{vid}"].iterdir() if ".adapter." in p.name]
    # one tracker run per cell (flow 1 + the 2 backfilled) and one for the backfill's single training pass
    assert len([p for p in adapters if ".2cells.adapter." in p.name]) == 1 and len(adapters) == 4
    first = json.loads(adapters[0].read_text().splitlines()[0])
    assert first["source"] == "default from the sweep id" and first["event"] == "start"
    print("e2e timings (s, cumulative):", {k: round(v) for k, v in timings.items()})
