"""The three user flows through a running Dagster (webserver + daemon via `dagster dev`), driven by GraphQL.

Setup: a temporary DAGSTER_HOME (SQLite, QueuedRunCoordinator, one run at a time), a temporary artifact root, the
tiny protocol (tiny random model, sample ARC), and a temporary sweep registry holding one tiny sweep with
`schedule: data` (the sensor registers it and makes its on-policy data; the user drives the cells). Then:
  1. the registry sensor registers the sweep (store + dynamic partition) and runs its sweep_data_job;
  2. flow 1: one partition of cell_job launched by GraphQL `launchRun` (what the UI's Materialize does);
  3. flow 2: a 25-partition backfill of the cell assets + compile + heatmap (`launchPartitionBackfill`), polled
     until it completes successfully;
  4. flow 3: a comedian sweep (2 chosen cells, schedule full) appended to the registry: the sensor launches its
     data, cells and report, and the villain sweep gets no run.
Artifacts on disk and run counts are asserted; the file tracker (with WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME set
to something else) must have put every step of a sweep into that sweep's project.
Each run is a fresh process (import torch + transformers), so the test is dominated by ~31 runs' start-up;
the backfill daemon also only wakes every 30 s. Measured: 7 min 10 s on 2 cores shared with a CPU benchmark
(~12 s per run: ~6 s process start + imports, ~6 s of steps and event writes).
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
VILLAIN = {**TINY, "source_persona": "villain", "schedule": "data"}
COMEDIAN = {**TINY, "source_persona": "comedian", "cells": [[1e-3, 1], [3e-2, 4]]}
CELL_ASSETS = ["adapter", "completions", "marker_rates", "arc_scores"]


def sweep_id(entry: dict) -> str:
    from zlt_dagster.core.sweep_file import sweep_from_dict

    return sweep_from_dict({k: v for k, v in entry.items() if k != "schedule"}).sweep_id


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

    # --- flow 1: one partition ---------------------------------------------------------------------------------
    key = partition_keys_for(villain)[7]  # lr=0.003_ep=3: its LR and epochs, readable
    assert key.keys_by_dimension["cell"] == "lr=0.003_ep=3"
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
    cell = villain.cells()[7]
    assert {k.split("/")[3] for k in store.list_keys(f"{layout.sweep_prefix(vid)}/cells")} == {cell.key}
    timings["flow1"] = time.monotonic() - t0

    # --- flow 2: the 25-partition backfill, compile and heatmap -------------------------------------------------
    names = [str(k) for k in partition_keys_for(villain)]
    assert len(names) == 25
    res = d.gql("""mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
        __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }""", {"p": {
        "partitionNames": names,
        "assetSelection": [{"path": [a]} for a in CELL_ASSETS + ["compiled_results", "heatmap"]]}})
    res = res["launchPartitionBackfill"]
    assert res["__typename"] == "LaunchBackfillSuccess", res
    backfill_id = res["backfillId"]

    def backfill_status():
        s = d.gql("""query($id: String!) { partitionBackfillOrError(backfillId: $id) {
            ... on PartitionBackfill { status } } }""", {"id": backfill_id})["partitionBackfillOrError"]["status"]
        return s if s in ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED") else None
    assert d.wait("the 25-partition backfill", backfill_status, 600, every=5) in ("COMPLETED", "COMPLETED_SUCCESS")
    backfill_runs = [r for r in d.runs() if r["tags"].get("dagster/backfill") == backfill_id]
    # the adapter's BackfillPolicy: ONE run trains all 25 cells in one pass (a partition range over the sweep),
    # then 25 per-cell evaluation runs (completions, marker rates, ARC) and one report run
    grouped = [r for r in backfill_runs if "dagster/asset_partition_range_start" in r["tags"]]
    assert len(grouped) == 1 and grouped[0]["tags"]["dagster/asset_partition_range_start"] == names[0]
    assert grouped[0]["tags"]["dagster/asset_partition_range_end"] == names[-1]
    assert len(backfill_runs) == 27 and all(r["status"] == "SUCCESS" for r in backfill_runs)
    for c in villain.cells():
        for artifact in CELL_ASSETS:
            assert store.artifact_exists(layout.cell_prefix(vid, c, artifact)), (c.key, artifact)
    compiled = json.loads(store.read_artifact_file(layout.compiled_prefix(vid), "compiled_results.json"))
    assert len(compiled["cells"]) == 25 and compiled["missing_cells"] == []
    assert store.read_artifact_file(layout.heatmap_prefix(vid), "heatmap.png")[:8] == b"\x89PNG\r\n\x1a\n"
    villain_runs = Counter(r["jobName"] for r in d.runs() if r["sweep"] == vid)
    assert sum(villain_runs.values()) == 1 + 1 + 27  # sensor's data run, flow 1, the backfill
    timings["flow2"] = time.monotonic() - t0

    # --- flow 3: append a persona; only its sweep gets runs ---------------------------------------------------
    d.registry.write_text(yaml.safe_dump([VILLAIN, COMEDIAN]))
    comedian = sweep_from_dict(COMEDIAN)
    cid = comedian.sweep_id

    def comedian_done():
        runs = [r for r in d.runs() if r["sweep"] == cid]
        assert all(r["status"] not in ("FAILURE", "CANCELED") for r in runs), runs
        jobs = Counter(r["jobName"] for r in runs if r["status"] == "SUCCESS")
        return jobs if jobs.get("report_job") else None
    jobs = d.wait("the comedian sweep's runs", comedian_done, 300)
    assert jobs == {"sweep_data_job": 1, "cell_job": 2, "report_job": 1}
    comedian_runs = [r for r in d.runs() if r["sweep"] == cid]
    assert all(r["tags"].get("dagster/sensor_name") == "sweep_registry_sensor" for r in comedian_runs)
    assert {r["tags"]["dagster/run_key"] for r in comedian_runs} == {
        f"{cid}:sweep_data_job", f"{cid}:lr=0.001_ep=1", f"{cid}:lr=0.03_ep=4", f"{cid}:report_job"}
    time.sleep(12)  # two more sensor ticks: still nothing for either sweep
    all_runs = d.runs()
    assert Counter(r["jobName"] for r in all_runs if r["sweep"] == vid) == villain_runs  # none after flow 2
    assert len([r for r in all_runs if r["sweep"] == cid]) == 4
    assert len(all_runs) == 1 + 1 + 27 + 4  # + the one grouped adapter run of the backfill
    compiled = json.loads(store.read_artifact_file(layout.compiled_prefix(cid), "compiled_results.json"))
    assert sorted(compiled["cells"]) == sorted(c.key for c in comedian.cells())
    assert store.artifact_exists(layout.heatmap_prefix(cid))
    timings["flow3"] = time.monotonic() - t0

    # --- tracking: every step of a sweep landed in that sweep's project, despite WANDB_PROJECT & co --------------
    projects = {p.name: p for p in (d.tmp / "tracking").iterdir()}
    assert set(projects) == {f"zlt-{vid}", f"zlt-{cid}"}
    adapters = [p for p in projects[f"zlt-{vid}"].iterdir() if ".adapter." in p.name]
    # one tracker run per cell (flow 1 + the 25 backfilled) and one for the backfill's single training pass
    assert len([p for p in adapters if ".25cells.adapter." in p.name]) == 1 and len(adapters) == 27
    first = json.loads(adapters[0].read_text().splitlines()[0])
    assert first["source"] == "default from the sweep id" and first["event"] == "start"
    print("e2e timings (s, cumulative):", {k: round(v) for k, v in timings.items()})

