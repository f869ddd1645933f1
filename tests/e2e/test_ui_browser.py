"""The Dagster UI as a researcher uses it, in headless Chromium at 1600 x 1000 and 100% zoom, against the real
webserver and daemon (`dagster dev` on loopback, tiny protocol):
  1. the registry sensor registers a sweep (schedule: data) and makes its on-policy data;
  2. on cell_job's page, "Materialize all" -> pick ONE partition by its key, dimension by dimension (typed into
     each selector's filter, as a user does) -> "Launch 1 run"; the run succeeds;
  3. compiled results + heatmap for the sweep (GraphQL launchRun, what the report job's Materialize does);
  4. the per-cell figure (marker_rates) and the heatmap each open in their metadata dialog and FIT it: no part
     outside the dialog, no sideways scrollbar;
  5. a registry entry with a typo makes the sensor's tick fail, naming the entry and the field, on its page.
Screenshots of each view go to $ZLT_E2E_SCREENSHOTS (docs/screenshots/take.sh) or the test's temp dir.
Needs a Chromium binary (Debian: apt-get install chromium; scripts/setup.sh installs it where it can); skipped
with that reason otherwise. ~2 min on 2 cores.
"""
from __future__ import annotations

import os
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

from cdp_browser import Browser, chromium_binary
from e2e_dagster import Dagster, dagster_env
import ui_actions as ui

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900),
              pytest.mark.skipif(chromium_binary() is None,
                                 reason="no Chromium binary on PATH (apt-get install chromium; scripts/setup.sh)")]

WIDTH, HEIGHT = 1600, 1000
VILLAIN = {"protocol": "tiny", "base_model": "tiny", "seed": 42, "source_persona": "villain", "schedule": "data"}
TYPO = {"protocol": "tiny", "base_model": "tiny", "seed": 42, "source_persona": "vilain"}
CELL = (1e-2, 3)  # (lr, epochs) of the cell the user picks: the tiny grid's 2nd LR, 3rd epochs value


def partition_for(sweep, lr: float, epochs: int):
    """THE one place this test turns a cell into its partition key, from the code's own partition definitions
    (never a hard-coded key string): the key whose cell is (lr, epochs). The UI is driven with its per-dimension
    values (keys_by_dimension), whatever format they have."""
    from zlt_dagster.core.protocol import Cell
    from zlt_dagster.defs.partitions import partition_key

    assert Cell(lr, epochs) in sweep.cells(), f"no partition of sweep {sweep.sweep_id} holds lr={lr}, epochs={epochs}"
    key = partition_key(sweep, Cell(lr, epochs))
    assert key.keys_by_dimension["cell"] == f"lr={lr!r}_ep={epochs}"  # readable: what the user types to pick it
    return key


def _fits(page, what: str) -> dict:
    fit = ui.figure_fit(page)
    (il, it, ir, ib), (dl, dt, dr, db) = fit["img"], fit["dialog"]
    assert not fit["sideways"], f"{what}: the figure dialog scrolls sideways: {fit}"
    assert dl <= il and ir <= dr and dt <= it and ib <= db, f"{what}: figure outside its dialog: {fit}"
    assert dr <= WIDTH and db <= HEIGHT, f"{what}: dialog outside the {WIDTH}x{HEIGHT} window: {fit}"
    assert abs((ir - il) - fit["natural"][0]) <= 1, f"{what}: figure drawn scaled (not 100%): {fit}"
    return fit


@pytest.fixture
def dagster(tmp_path):
    d = Dagster(tmp_path, dagster_env(tmp_path, [VILLAIN]))
    try:
        yield d
    finally:
        d.stop()


def test_pick_one_partition_launch_it_and_read_its_figures(dagster, tmp_path):
    from zlt_dagster.core.sweep_file import sweep_from_dict

    d = dagster
    shots = Path(os.environ.get("ZLT_E2E_SCREENSHOTS") or tmp_path / "screenshots")
    sweep = sweep_from_dict({k: v for k, v in VILLAIN.items() if k != "schedule"})
    sid = sweep.sweep_id
    key = partition_for(sweep, *CELL)
    location, repository = d.wait("the code location to load", d.location, 300)
    d.wait("the sensor's on-policy data run", lambda: [r for r in d.runs() if r["jobName"] == "sweep_data_job"
                                                        and r["status"] == "SUCCESS"], 300)
    d.gql("mutation { setNuxSeen }")  # the "join the community" dialog shown on localhost
    loc = urllib.parse.quote(location)

    with Browser(WIDTH, HEIGHT) as page:
        # --- pick one partition by its key and launch it, as a user does ----------------------------------
        page.goto(f"{d.base}/locations/{loc}/jobs/cell_job")
        ui.click_button(page, "Materialize all", "cell_job's page")
        page.wait(page.text("Partition selection"), "the launch dialog")
        for dimension, value in key.keys_by_dimension.items():
            ui.pick_partition(page, dimension, value)
        page.wait(page.text("1 partition"), "one partition selected")
        page.shot(shots / "launch_one_partition.png")
        ui.click_button(page, "Launch 1 run", "the launch dialog")

        def cell_run():
            runs = [r for r in d.runs() if r["jobName"] != "sweep_data_job"]
            return runs and runs[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED") and runs
        [run] = d.wait("the launched run", cell_run, 300)
        assert run["status"] == "SUCCESS", run
        assert run["tags"]["dagster/partition"] == str(key), run["tags"]  # exactly the picked partition

        # --- the report for the sweep (1 of 25 cells done; the others n/a) -------------------------------------
        res = d.gql("""mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename } }""", {"p": {
            "selector": {"repositoryLocationName": location, "repositoryName": repository, "jobName": "report_job"},
            "runConfigData": {}, "executionMetadata": {"tags": [{"key": "dagster/partition", "value": sid}]}}})
        assert res["launchRun"]["__typename"] == "LaunchRunSuccess", res
        d.wait("the report run", lambda: any(r["jobName"] == "report_job" and r["status"] == "SUCCESS"
                                             for r in d.runs()), 300)

        # --- figures fit their dialog at 100% zoom --------------------------------------------------------------
        page.goto(f"{d.base}/assets/marker_rates?view=partitions&partition={urllib.parse.quote(str(key))}")
        ui.open_markdown_figure(page)
        _fits(page, "marker_rates figure")
        page.shot(shots / "cell_figure.png")

        page.goto(f"{d.base}/assets/heatmap?view=partitions&partition={urllib.parse.quote(sid)}")
        ui.open_markdown_figure(page)
        fit = _fits(page, "heatmap")
        page.shot(shots / "heatmap_asset.png")
        print("heatmap in its dialog (CSS px):", fit)

        page.goto(f"{d.base}/assets/adapter?view=partitions&partition={urllib.parse.quote(str(key))}")
        page.wait(page.text("tokens_per_s"), "adapter's partition metadata")
        time.sleep(1)
        page.shot(shots / "adapter_partitions.png")

        page.goto(f"{d.base}/locations/{loc}/asset-groups/zlt_sweep")
        page.wait(page.text("compiled_results") + " && " + page.text("onpolicy_data"), "the asset graph")
        time.sleep(3)  # layout animation
        page.shot(shots / "asset_graph.png")

        # --- a typo in the registry: a failed tick naming the entry and the field -------------------------------
        d.registry.write_text(yaml.safe_dump([VILLAIN, TYPO]))
        selector = {"repositoryLocationName": location, "repositoryName": repository,
                    "sensorName": "sweep_registry_sensor"}

        def failed_tick():
            s = d.gql("""query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { ... on Sensor {
                sensorState { ticks(limit: 3) { status error { message causes { message } } } } } } }""",
                      {"s": selector})
            return next((t for t in s["sensorOrError"]["sensorState"]["ticks"] if t["status"] == "FAILURE"), None)
        tick = d.wait("a failed sensor tick", failed_tick, 120)
        # the UI's tick dialog shows Dagster's wrapper and, below it, our error as its cause
        message = " ".join([tick["error"]["message"]] + [c["message"] for c in tick["error"]["causes"]])
        assert "entry 2 (source_persona=vilain" in message and "source_persona: unknown source persona" in message
        assert "assistant" not in message.split("expected one of")[1], message
        page.goto(f"{d.base}/locations/{loc}/sensors/sweep_registry_sensor")
        page.wait(page.text("Failure"), "the failed tick in the sensor's tick list")
        ui.click_leaf(page, "View", "the failed tick's error")  # "Latest tick: Failure View"
        page.wait(page.text("entry 2 (source_persona=vilain") + " && " + page.text("source_persona: unknown"),
                  "the tick's error naming the entry and the field")
        time.sleep(1)
        page.shot(shots / "sensor_tick_failed.png")
