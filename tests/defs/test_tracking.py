"""Tracking precedence: run tag > ZLT_TRACKING_PROJECT > the tracker's own variable > default from the sweep id.

The reference run lost 19 of 25 cells because WANDB_PROJECT silently overrode the name the script set; these
tests set the trackers' own variables to something else and check the explicit name still wins, the decision is
described with its source, and a tracker that ignores the name is caught."""
from __future__ import annotations

import json
import os
import types

import pytest

from zlt_dagster.defs import tracking
from zlt_dagster.defs.tracking import ProjectChoice, TrackingError, default_project, open_run, resolve_project

SID = "villain_s42_tiny_tiny_abcd12"
HOSTILE = {"WANDB_PROJECT": "huggingface", "MLFLOW_EXPERIMENT_NAME": "Default"}


def test_default_is_derived_from_the_sweep_id():
    c = resolve_project("wandb", SID, env={})
    assert c.value == f"zlt-{SID}" and c.source == "default from the sweep id" and c.overridden == ()


@pytest.mark.parametrize("tracker, var", [("wandb", "WANDB_PROJECT"), ("mlflow", "MLFLOW_EXPERIMENT_NAME")])
def test_trackers_own_variable_beats_only_the_default(tracker, var):
    c = resolve_project(tracker, SID, env={var: "theirs"})
    assert (c.value, c.source) == ("theirs", f"env {var} (the tracker's own variable)")


@pytest.mark.parametrize("tracker, var", [("wandb", "WANDB_PROJECT"), ("mlflow", "MLFLOW_EXPERIMENT_NAME")])
def test_project_variable_beats_the_trackers_variable(tracker, var):
    c = resolve_project(tracker, SID, env={**HOSTILE, "ZLT_TRACKING_PROJECT": "zlt-paper"})
    assert (c.value, c.source) == ("zlt-paper", "env ZLT_TRACKING_PROJECT")
    assert c.overridden == ((f"env {var}", HOSTILE[var]),)
    assert f"overriding env {var}='{HOSTILE[var]}'" in c.describe()


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "file", "off"])
def test_explicit_run_tag_wins_over_every_environment_variable(tracker):
    env = {**HOSTILE, "ZLT_TRACKING_PROJECT": "zlt-env"}
    c = resolve_project(tracker, SID, run_tag="villain-seeds", env=env)
    assert (c.value, c.source) == ("villain-seeds", "run tag zlt/tracking_project")
    assert ("env ZLT_TRACKING_PROJECT", "zlt-env") in c.overridden
    text = c.describe()
    assert "'villain-seeds' from run tag zlt/tracking_project" in text and "zlt-env" in text


def test_file_and_off_trackers_ignore_wandb_and_mlflow_variables():
    for tracker in ("file", "off"):
        c = resolve_project(tracker, SID, env=HOSTILE)
        assert c.value == default_project(SID) and c.overridden == ()
    assert "tracker off" in resolve_project("off", SID, env={}).describe()


def test_empty_values_count_as_unset():
    c = resolve_project("wandb", SID, run_tag="", env={"ZLT_TRACKING_PROJECT": "", "WANDB_PROJECT": ""})
    assert c.source == "default from the sweep id"


def test_invalid_names_and_kinds_are_errors_naming_the_source():
    with pytest.raises(TrackingError, match="run tag zlt/tracking_project"):
        resolve_project("wandb", SID, run_tag="a/b", env={})
    with pytest.raises(TrackingError, match="not one of"):
        resolve_project("neptune", SID, env={})
    assert "/" not in default_project("x/y")


def test_file_backend_records_the_decision_and_the_mirrored_numbers(tmp_path):
    choice = resolve_project("file", SID, run_tag="proj", env=HOSTILE)
    run = open_run(choice, "cell.lr=0.001_ep=1.adapter.abcd", {"sweep_id": SID}, file_root=tmp_path)
    run.log({"tokens": 120, "final_loss": 0.5, "regime": "selective", "flag": True})
    run.finish()
    lines = [json.loads(x) for x in (tmp_path / "proj" / "cell.lr=0.001_ep=1.adapter.abcd.jsonl").read_text()
             .splitlines()]
    assert [r["event"] for r in lines] == ["start", "metrics", "end"]
    assert lines[0]["project"] == "proj" and lines[0]["source"] == "run tag zlt/tracking_project"
    assert lines[1]["metrics"] == {"tokens": 120.0, "final_loss": 0.5}
    assert lines[1]["labels"] == {"regime": "selective"}


def _fake_wandb(obey_env: bool, constant: str | None = None):
    """A stand-in for wandb.init. obey_env=True mimics the trap: the library's own WANDB_PROJECT beats the
    argument. constant mimics a callback that hard-wires its own project."""
    def init(project, name, config):
        used = constant or (os.environ.get("WANDB_PROJECT") if obey_env else None) or project
        return types.SimpleNamespace(project=used, log=lambda m: None, finish=lambda exit_code=0: None)
    return types.SimpleNamespace(init=init)


def test_wandb_backend_pins_the_variable_so_a_library_reading_it_agrees(monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "huggingface")
    choice = resolve_project("wandb", SID, run_tag="zlt-explicit")
    run = tracking.WandbRun(choice, "r", {}, wandb=_fake_wandb(obey_env=True))
    assert run.run.project == "zlt-explicit"
    assert os.environ["WANDB_PROJECT"] == "zlt-explicit"  # pinned for the run ...
    run.finish()
    assert os.environ["WANDB_PROJECT"] == "huggingface"  # ... and restored afterwards


def test_wandb_backend_refuses_a_run_that_landed_in_another_project(monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    choice = resolve_project("wandb", SID, run_tag="zlt-explicit", env={})
    with pytest.raises(TrackingError, match="'huggingface', not 'zlt-explicit'"):
        tracking.WandbRun(choice, "r", {}, wandb=_fake_wandb(obey_env=False, constant="huggingface"))
    assert "WANDB_PROJECT" not in os.environ  # pin undone on failure


def _fake_mlflow(ignore_experiment_id: bool):
    state = {}

    def set_experiment(name):
        state["exp"] = types.SimpleNamespace(experiment_id=f"id-{name}")
        return state["exp"]

    def start_run(experiment_id, run_name):
        used = f"id-{os.environ.get('MLFLOW_EXPERIMENT_NAME')}" if ignore_experiment_id else experiment_id
        return types.SimpleNamespace(info=types.SimpleNamespace(experiment_id=used))

    return types.SimpleNamespace(set_tracking_uri=lambda uri: None, set_experiment=set_experiment,
                                 active_run=lambda: None, start_run=start_run, end_run=lambda status: None,
                                 log_params=lambda p: None, log_metrics=lambda m: None)


def test_mlflow_backend_passes_the_experiment_explicitly_and_checks_it(monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "Default")
    monkeypatch.setenv("ZLT_TRACKING_PROJECT", "zlt-paper")
    choice = resolve_project("mlflow", SID)
    assert choice.value == "zlt-paper"
    run = tracking.MlflowRun(choice, "r", "", {"a": 1}, mlflow=_fake_mlflow(ignore_experiment_id=False))
    assert run.run.info.experiment_id == "id-zlt-paper"
    run.finish()
    assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "Default"


def test_off_opens_nothing(tmp_path):
    run = open_run(ProjectChoice("x", "default from the sweep id", tracker="off"), "r", file_root=tmp_path)
    run.log({"a": 1})
    run.finish()
    assert not any(tmp_path.iterdir())


def test_missing_optional_package_is_a_clear_error(monkeypatch):
    import sys

    for module in ("mlflow", "wandb"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(TrackingError, match=r"pip install wandb, or the project's `tracking` extra"):
        open_run(resolve_project("wandb", SID, env={}), "r")
    with pytest.raises(TrackingError, match="pip install mlflow-skinny"):
        open_run(resolve_project("mlflow", SID, env={}), "r")
