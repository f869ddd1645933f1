"""The external trackers for real, offline: MLflow (a SQLite tracking store in tmp) through Dagster materializations,
and W&B in offline mode. Both with the tracker's own environment variable set to something else, the trap that
cost the reference run 19 of 25 cells: the run must land where the documented precedence says, and nowhere else.
(tests/defs/test_tracking.py covers the precedence itself and the failure paths with stand-ins.)"""
from __future__ import annotations

import os

import pytest
from dagster import materialize

from zlt_dagster.defs import tracking
from zlt_dagster.defs.assets import ALL_ASSETS, CELL_ASSETS, onpolicy_data
from zlt_dagster.defs.partitions import partition_keys_for

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
HOSTILE_EXPERIMENT = "someone-else"


@pytest.fixture
def mlflow_env(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the `test` extra installs mlflow-skinny")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("ZLT_TRACKING", "mlflow")
    monkeypatch.setenv("ZLT_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", HOSTILE_EXPERIMENT)
    monkeypatch.delenv("ZLT_TRACKING_PROJECT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield uri
    import mlflow

    while mlflow.active_run() is not None:  # never leak a run into other tests of this process
        mlflow.end_run(status="FAILED")


def _runs(uri: str) -> dict[str, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {e.name: client.search_runs([e.experiment_id]) for e in client.search_experiments()}


def test_mlflow_runs_land_in_the_decided_experiment_through_dagster(mlflow_env, dagster_instance, resources,
                                                                    register, monkeypatch):
    sweep = register(source_persona="villain")
    res = materialize(ALL_ASSETS, selection=[onpolicy_data], partition_key=sweep.sweep_id,
                      instance=dagster_instance, resources=resources, run_config=QUIET)
    assert res.success
    # no run tag, no ZLT_TRACKING_PROJECT: the tracker's own variable (precedence 3) names the experiment, and the
    # decision says so; nothing lands in a default experiment behind the user's back
    runs = _runs(mlflow_env)
    assert set(runs) - {"Default"} == {HOSTILE_EXPERIMENT}, runs.keys()
    (run,) = runs[HOSTILE_EXPERIMENT]
    assert run.info.status == "FINISHED" and run.info.run_name.startswith(f"{sweep.sweep_id}.sweep.onpolicy_data.")
    assert run.data.metrics["kept"] > 0 and run.data.params["sweep_id"] == sweep.sweep_id
    meta = res.get_asset_materialization_events()[0].step_materialization_data.materialization.metadata
    assert meta["tracking_project"].value == HOSTILE_EXPERIMENT
    assert meta["tracking_source"].value.startswith("env MLFLOW_EXPERIMENT_NAME")
    # 2. ZLT_TRACKING_PROJECT beats the tracker's variable; 1. the run tag beats both
    monkeypatch.setenv("ZLT_TRACKING_PROJECT", "zlt-deployment")
    key = partition_keys_for(sweep)[0]
    for tags, expected in (({}, "zlt-deployment"), ({tracking.RUN_TAG: "zlt-tagged"}, "zlt-tagged")):
        res = materialize(ALL_ASSETS, selection=CELL_ASSETS[:1], partition_key=key, instance=dagster_instance,
                          resources=resources, run_config=QUIET, tags=tags)
        assert res.success
        (run,) = [r for r in _runs(mlflow_env)[expected] if ".adapter." in r.info.run_name]
        assert run.info.status == "FINISHED" and run.data.metrics["steps"] > 0
        assert len(_runs(mlflow_env)[HOSTILE_EXPERIMENT]) == 1  # nothing more went to the tracker's variable
    assert os.environ["MLFLOW_EXPERIMENT_NAME"] == HOSTILE_EXPERIMENT  # the pin is undone after each step


def test_a_failed_step_closes_its_mlflow_run_and_the_next_step_still_tracks(mlflow_env, dagster_instance,
                                                                           resources, register):
    """In one process (the in-process executor, `zlt demo`): a step that fails must close its run as FAILED;
    otherwise MLflow refuses to start the next step's run."""
    import mlflow

    sweep = register(source_persona="villain")
    key = partition_keys_for(sweep)[3]
    # adapter before its on-policy data exists: bad input, the step fails once (no retry)
    res = materialize(ALL_ASSETS, selection=CELL_ASSETS[:1], partition_key=key, instance=dagster_instance,
                      resources=resources, run_config=QUIET, raise_on_error=False)
    assert not res.success
    assert mlflow.active_run() is None
    (failed,) = _runs(mlflow_env)[HOSTILE_EXPERIMENT]
    assert failed.info.status == "FAILED"
    res = materialize(ALL_ASSETS, selection=[onpolicy_data], partition_key=sweep.sweep_id,
                      instance=dagster_instance, resources=resources, run_config=QUIET)
    assert res.success
    statuses = sorted(r.info.status for r in _runs(mlflow_env)[HOSTILE_EXPERIMENT])
    assert statuses == ["FAILED", "FINISHED"]


def test_a_run_left_open_by_a_crash_is_closed_before_the_next_one(mlflow_env):
    import mlflow

    mlflow.set_tracking_uri(mlflow_env)
    exp = mlflow.set_experiment("crashed")
    left_open = mlflow.start_run(experiment_id=exp.experiment_id)
    choice = tracking.resolve_project("mlflow", "sid", run_tag="zlt-next")
    run = tracking.open_run(choice, "next", uri=mlflow_env)
    run.log({"x": 1.0})
    run.finish("success")
    runs = _runs(mlflow_env)
    assert [r.info.status for r in runs["crashed"]] == ["FAILED"]
    assert runs["crashed"][0].info.run_id == left_open.info.run_id
    assert [r.info.status for r in runs["zlt-next"]] == ["FINISHED"]


def test_wandb_offline_run_lands_in_the_decided_project(tmp_path, monkeypatch):
    """Real wandb, offline (no network): WANDB_PROJECT says 'huggingface', the run tag says otherwise."""
    wandb = pytest.importorskip("wandb", reason="the `test` extra installs wandb")
    for var, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                       "WANDB_DISABLE_GIT": "true", "WANDB_PROJECT": "huggingface"}.items():
        monkeypatch.setenv(var, value)
    choice = tracking.resolve_project("wandb", "sid", run_tag="zlt-explicit")
    assert ("env WANDB_PROJECT", "huggingface") in choice.overridden
    run = tracking.open_run(choice, "villain.cell.adapter", {"lr": 1e-5})
    assert run.run.project == "zlt-explicit"
    assert os.environ["WANDB_PROJECT"] == "zlt-explicit"  # a callback reading the variable now agrees
    run.log({"final_loss": 0.5, "regime": "selective"})  # non-numbers are not sent
    offline_dir = run.run.dir
    run.finish("success")
    assert os.environ["WANDB_PROJECT"] == "huggingface"
    assert "offline-run-" in offline_dir and any((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert wandb.run is None
