"""The sweep registry and its sensor, evaluated directly (no daemon): what gets registered and requested, and
that existing sweeps get nothing. The end-to-end path through a running daemon is tests/e2e/test_user_flows.py.
Also the follow-up configs (configs/followups/*.yaml): each loads into the sweeps and cells it promises."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from dagster import (
    DagsterInstance, DagsterRunStatus, MultiPartitionKey, RunsFilter, SensorResult, build_sensor_context, materialize,
)
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG

from zlt_dagster import steps
from zlt_dagster.steps import layout
from zlt_dagster.core.protocol import PAPER, Cell
from zlt_dagster.defs.assets import ALL_ASSETS, CELL_ASSETS, base_arc_scores, compiled_results, heatmap, onpolicy_data
from zlt_dagster.defs.partitions import partition_keys_for
from zlt_dagster.defs.registry import PlannedRun, RegistryError, read_registry
from zlt_dagster.defs.sensors import RegistryEntryError, sweep_registry_sensor

REPO = Path(__file__).resolve().parents[2]
SENSOR = "sweep_registry_sensor"
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
TINY = {"protocol": "tiny", "base_model": "tiny", "seed": 42}
JOB_ASSETS = {"sweep_data_job": [onpolicy_data, base_arc_scores], "cell_job": CELL_ASSETS,
              "report_job": [compiled_results, heatmap]}


def write_registry(path: Path, entries) -> Path:
    path.write_text(yaml.safe_dump(entries))
    return path


def tick(instance: DagsterInstance, resources) -> SensorResult:
    """One sensor evaluation; applies its partition requests as the daemon would."""
    res = sweep_registry_sensor(build_sensor_context(instance=instance, resources={"store": resources["store"]}))
    assert isinstance(res, SensorResult)
    for req in res.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return res


def execute(requests, instance, resources) -> None:
    """Run what the sensor asked for, in-process, tagged as the sensor daemon tags its runs (run key + sensor name:
    the tags Dagster's daemon uses to drop a request whose run key was used before)."""
    for req in requests:
        tags = {**req.tags, RUN_KEY_TAG: req.run_key, SENSOR_NAME_TAG: SENSOR}
        res = materialize(ALL_ASSETS, selection=JOB_ASSETS[req.job_name], partition_key=req.partition_key,
                          instance=instance, resources=resources, run_config=QUIET, tags=tags)
        assert res.success


def used_run_keys(instance: DagsterInstance) -> set[str]:
    """Run keys the daemon would drop for this sensor (dagster/_daemon/sensor.py: fetch_existing_runs)."""
    return {r.tags[RUN_KEY_TAG] for r in instance.get_runs(filters=RunsFilter(tags={SENSOR_NAME_TAG: SENSOR}))}


def test_a_sweep_stored_under_its_legacy_id_keeps_it_and_its_results(registry, dagster_instance, resources):
    """A finished sweep registered before ids were led by persona and seed (sweeps/<model>__<persona>__s<seed>__...)
    is found under that id: nothing is recomputed, no second sweep appears."""
    entry = {**TINY, "source_persona": "villain", "cells": [[1e-3, 1]]}
    write_registry(registry, [entry])
    run_until_idle(dagster_instance, resources)
    [e], _ = read_registry(registry)
    store = resources["store"].get_store()
    legacy = steps.sweeps.legacy_sweep_id(e.sweep)
    assert legacy.startswith("tiny__villain__s42__tiny__tail0__")
    for key in store.list_keys(layout.sweep_prefix(e.sweep.sweep_id)):  # the store as the old scheme left it
        store.put_bytes(key.replace(e.sweep.sweep_id, legacy, 1), store.get_bytes(key))
    store.delete_prefix(layout.sweep_prefix(e.sweep.sweep_id))
    from dagster import instance_for_test

    with instance_for_test() as fresh:
        res = tick(fresh, resources)
        assert res.run_requests == [] and fresh.has_dynamic_partition("sweeps", legacy)
    assert steps.as_stored(store, e.sweep).sweep_id == legacy
    assert steps.load_sweep(store, legacy).sweep_id == legacy
    assert not store.exists(layout.sweep_config_key(e.sweep.sweep_id))


def test_a_sweep_stored_before_gguf_and_custom_left_its_id_keeps_it(tmp_path):
    """Ids made before `.gguf` was dropped from the model part and `-custom` marked protocol overrides: the same
    config is found under that id (zlt run and the sensor go through steps.as_stored), never recomputed."""
    from zlt_dagster.core.protocol import Sweep, get_protocol
    from zlt_dagster.storage import LocalStore

    model = tmp_path / "SmolLM2-135M-Instruct-Q8_0.gguf"
    sweep = Sweep(get_protocol("tiny", {"learning_rates": [1e-3, 3e-3]}), base_model=str(model))
    old = f"villain_s42_tiny_smollm2-135m-instruct-q8-0.gguf_{sweep.config_hash()[:6]}"
    assert sweep.sweep_id == f"villain_s42_tiny-custom_smollm2-135m-instruct-q8-0_{sweep.config_hash()[:6]}"
    assert steps.sweeps.previous_sweep_ids(sweep)[0] == old
    store = LocalStore(tmp_path / "store")
    assert steps.as_stored(store, sweep) == sweep  # nothing stored: the new id
    store.write_json(layout.sweep_config_key(old), sweep.to_dict())
    assert steps.as_stored(store, sweep).sweep_id == old
    assert steps.load_sweep(store, old).sweep_id == old
    other = Sweep(get_protocol("tiny", {"learning_rates": [1e-3, 3e-3]}), base_model=str(model), seed=1)
    assert steps.as_stored(store, other) == other


def run_until_idle(instance, resources, max_ticks: int = 6) -> SensorResult:
    """Tick and execute until a tick requests nothing; every request must carry a run key not used before."""
    for _ in range(max_ticks):
        res = tick(instance, resources)
        if not res.run_requests:
            return res
        assert not {r.run_key for r in res.run_requests} & used_run_keys(instance), "Dagster would drop these"
        execute(res.run_requests, instance, resources)
    raise AssertionError(f"still requesting after {max_ticks} ticks")


def skip(res: SensorResult) -> str:
    return res.skip_reason.skip_message if res.skip_reason else ""


def summary(res: SensorResult) -> list[tuple[str, str]]:
    return [(r.job_name, r.run_key) for r in res.run_requests]


@pytest.fixture
def registry(tmp_path, monkeypatch):
    path = tmp_path / "sweeps.yaml"
    monkeypatch.setenv("ZLT_SWEEP_REGISTRY", str(path))
    return path


# --- the registry file ----------------------------------------------------------------------------------------
def test_repo_registry_holds_the_demo_sweep():
    entries, problems = read_registry(REPO / "configs/sweeps.yaml")
    assert problems == []
    [e] = entries
    s = e.sweep
    assert (s.protocol.name, s.base_model, s.source_persona, s.seed, e.schedule) == \
        ("demo", "smollm2-135m", "villain", 42, "full")
    assert len(s.cells()) == 25


def test_bad_entries_are_named_and_the_others_still_read(tmp_path):
    path = write_registry(tmp_path / "r.yaml", [
        {**TINY, "source_persona": "villain"},
        {**TINY, "source_persona": "pirate"},                      # unknown persona
        {**TINY, "source_persona": "comedian", "schedule": "sometimes"},
        {**TINY, "source_persona": "comedian", "lr": 1e-3},      # unknown field
        "just a string",
        {**TINY, "source_persona": "software_engineer"},
    ])
    entries, problems = read_registry(path)
    assert [e.sweep.source_persona for e in entries] == ["villain", "software_engineer"]
    text = [str(p) for p in problems]
    assert len(text) == 4
    assert "entry 2 (source_persona=pirate, seed=42)" in text[0] and "pirate" in text[0]
    assert "entry 3" in text[1] and "schedule='sometimes'" in text[1]
    assert "entry 4" in text[2] and "unknown field" in text[2]
    assert "entry 5" in text[3]


def test_duplicates_includes_and_unreadable_files(tmp_path):
    sub = write_registry(tmp_path / "sub.yaml", {"sweeps": [{**TINY, "source_persona": "comedian"}]})
    path = write_registry(tmp_path / "r.yaml", [
        {**TINY, "source_persona": "villain"}, {**TINY, "source_persona": "villain"},  # same sweep twice: one
        {"include": sub.name},
        {**TINY, "source_persona": "villain", "name": "taken"},
        {**TINY, "source_persona": "comedian", "name": "taken"},  # same id, other config
    ])
    entries, problems = read_registry(path)
    assert [e.sweep.source_persona for e in entries] == ["villain", "comedian", "villain"]
    assert len(problems) == 1 and "'taken' is already used" in str(problems[0])
    (tmp_path / "loop.yaml").write_text("- include: loop.yaml\n")
    assert "includes itself" in str(read_registry(tmp_path / "loop.yaml")[1][0])
    (tmp_path / "bad.yaml").write_text("- protocol: [unclosed\n")
    with pytest.raises(RegistryError, match="not valid YAML"):
        read_registry(tmp_path / "bad.yaml")
    with pytest.raises(RegistryError, match="does not exist"):
        read_registry(tmp_path / "missing.yaml")


def test_a_key_given_twice_in_the_registry_is_refused_naming_file_key_and_line(tmp_path):
    """PyYAML keeps the last of two equal keys: the entry below ran seed 2 with no word about seed 1."""
    path = tmp_path / "dup.yaml"
    path.write_text("- protocol: tiny\n  base_model: tiny\n  seed: 1\n  seed: 2\n")
    with pytest.raises(RegistryError) as e:
        read_registry(path)
    assert str(e.value) == (f"sweep registry {path} is not valid YAML: duplicate key 'seed' (first at line 3) at "
                            "line 4, column 3")


def test_run_keys_name_sweep_and_partition():
    assert PlannedRun("cell_job", "s1", "lr=0.003_ep=3").run_key == "s1:lr=0.003_ep=3"
    assert PlannedRun("sweep_data_job", "s1", None).run_key == "s1:sweep_data_job"


# --- the sensor -------------------------------------------------------------------------------------------------
def test_sensor_schedules_a_new_sweep_stage_by_stage_then_nothing(registry, dagster_instance, resources):
    write_registry(registry, [{**TINY, "source_persona": "villain", "cells": [[1e-3, 1], [3e-3, 2]]}])
    store = resources["store"].get_store()
    res = tick(dagster_instance, resources)
    [sweep_entry], _ = read_registry(registry)
    sid = sweep_entry.sweep.sweep_id
    assert store.exists(layout.sweep_config_key(sid))  # registered
    assert dagster_instance.has_dynamic_partition("sweeps", sid)
    assert [c for c in ("lr=0.001_ep=1", "lr=0.003_ep=2") if dagster_instance.has_dynamic_partition("cells", c)] == [
        "lr=0.001_ep=1", "lr=0.003_ep=2"]  # its cells, readable, pickable
    assert summary(res) == [("sweep_data_job", f"{sid}:sweep_data_job")]
    assert res.run_requests[0].partition_key == sid and res.run_requests[0].tags["zlt/sweep"] == sid
    # the data run has not finished: the same request again (Dagster drops it: same run key), no cells yet
    assert summary(tick(dagster_instance, resources)) == [("sweep_data_job", f"{sid}:sweep_data_job")]
    execute(res.run_requests, dagster_instance, resources)

    res = tick(dagster_instance, resources)
    assert summary(res) == [("cell_job", f"{sid}:lr=0.001_ep=1"), ("cell_job", f"{sid}:lr=0.003_ep=2")]
    assert res.run_requests[1].partition_key == MultiPartitionKey({"sweep": sid, "cell": "lr=0.003_ep=2"})
    execute(res.run_requests[:1], dagster_instance, resources)
    # a report made by hand from the UI halfway through does not satisfy the sensor
    materialize(ALL_ASSETS, selection=[compiled_results, heatmap], partition_key=sid, instance=dagster_instance,
                resources=resources, run_config=QUIET)
    assert summary(tick(dagster_instance, resources)) == [("cell_job", f"{sid}:lr=0.003_ep=2")]  # no report yet
    execute(res.run_requests[1:], dagster_instance, resources)

    res = tick(dagster_instance, resources)
    assert summary(res) == [("report_job", f"{sid}:report_job")]
    execute(res.run_requests, dagster_instance, resources)
    assert store.artifact_exists(layout.heatmap_prefix(sid))

    res = tick(dagster_instance, resources)  # complete: nothing, and it says so
    assert res.run_requests == [] and "nothing to launch" in skip(res)
    assert not res.dynamic_partitions_requests


def test_new_persona_gets_runs_existing_sweep_gets_none(registry, dagster_instance, resources, register):
    done = register(source_persona="villain", cells_subset=((1e-3, 1),))
    entry = {**TINY, "source_persona": "villain", "cells": [[1e-3, 1]]}
    write_registry(registry, [entry])
    execute(tick(dagster_instance, resources).run_requests, dagster_instance, resources)
    for _ in range(2):
        execute(tick(dagster_instance, resources).run_requests, dagster_instance, resources)
    assert tick(dagster_instance, resources).run_requests == []
    # a fresh Dagster instance over the same store (e.g. a new DAGSTER_HOME): still nothing to re-run
    from dagster import instance_for_test

    with instance_for_test() as fresh:
        res = tick(fresh, resources)
        assert res.run_requests == [] and fresh.has_dynamic_partition("sweeps", done.sweep_id)

    write_registry(registry, [entry, {**TINY, "source_persona": "comedian", "cells": [[1e-3, 1]]}])
    res = tick(dagster_instance, resources)
    assert [r.job_name for r in res.run_requests] == ["sweep_data_job"]
    assert all(r.tags["zlt/sweep"] != done.sweep_id for r in res.run_requests)
    new_ids = [k for req in res.dynamic_partitions_requests for k in req.partition_keys]
    assert len(new_ids) == 1 and new_ids[0] != done.sweep_id and "comedian" in new_ids[0]


def test_deleted_cell_artifact_is_rebuilt_exactly_that_cell_however_often(registry, dagster_instance, resources):
    """Run keys are not forever: a cell deleted after the sweep finished is rebuilt, each time it goes missing."""
    write_registry(registry, [{**TINY, "source_persona": "villain", "cells": [[1e-3, 1], [3e-3, 2]]}])
    store = resources["store"].get_store()
    idle = run_until_idle(dagster_instance, resources)
    [entry], _ = read_registry(registry)
    sweep, sid = entry.sweep, entry.sweep.sweep_id
    assert "complete (2 cells verified, report up to date)" in skip(idle)
    n_runs = len(dagster_instance.get_runs())
    for n in (1, 2):  # built once by the sweep, then rebuilt after each deletion
        store.delete_prefix(layout.cell_prefix(sid, Cell(3e-3, 2), "marker_rates"))
        res = tick(dagster_instance, resources)
        assert summary(res) == [("cell_job", f"{sid}:lr=0.003_ep=2:rebuild{n}")]  # exactly that cell
        assert res.run_requests[0].run_key not in used_run_keys(dagster_instance)
        execute(res.run_requests, dagster_instance, resources)
        res = tick(dagster_instance, resources)  # the report predates the rebuilt cell: compiled again
        assert summary(res) == [("report_job", f"{sid}:report_job:rebuild{n}")]
        execute(res.run_requests, dagster_instance, resources)
        assert tick(dagster_instance, resources).run_requests == []
    assert len(dagster_instance.get_runs()) == n_runs + 4
    assert all(steps.cell_done(store, sweep, c) for c in sweep.cells())


def finished_one_cell_sweep(registry, dagster_instance, resources):
    """A registry of one villain sweep of one cell, run by the sensor until idle: (store, its entry, sweep id)."""
    write_registry(registry, [{**TINY, "source_persona": "villain", "cells": [[1e-3, 1]]}])
    store = resources["store"].get_store()
    run_until_idle(dagster_instance, resources)
    [entry], _ = read_registry(registry)
    return store, entry, entry.sweep.sweep_id


def test_wiped_artifact_root_rebuilds_the_sweep(registry, dagster_instance, resources):
    store, entry, sid = finished_one_cell_sweep(registry, dagster_instance, resources)
    shutil.rmtree(store.root)  # the Dagster instance keeps every run and run key
    res = tick(dagster_instance, resources)
    assert summary(res) == [("sweep_data_job", f"{sid}:sweep_data_job:rebuild1")]
    assert store.exists(layout.sweep_config_key(sid))  # registered again
    idle = run_until_idle(dagster_instance, resources)
    assert "complete" in skip(idle)
    for prefix in (layout.onpolicy_prefix(sid), layout.base_arc_prefix(sid), layout.heatmap_prefix(sid),
                   *(layout.cell_prefix(sid, Cell(1e-3, 1), a) for a in layout.CELL_ARTIFACTS)):
        assert store.artifact_problem(prefix) is None, prefix


def test_torn_cell_artifact_is_rebuilt_not_counted(registry, dagster_instance, resources):
    store, entry, sid = finished_one_cell_sweep(registry, dagster_instance, resources)
    prefix = layout.cell_prefix(sid, Cell(1e-3, 1), "arc_scores")
    store.put_bytes(f"{prefix}/arc_scores.json", b'{"acc": 1.0}')  # another writer's file under this manifest
    assert "ChecksumError" in steps.cell_problem(store, entry.sweep, Cell(1e-3, 1))
    res = tick(dagster_instance, resources)
    assert summary(res) == [("cell_job", f"{sid}:lr=0.001_ep=1:rebuild1")]
    execute(res.run_requests, dagster_instance, resources)
    assert store.artifact_problem(prefix) is None


def test_in_flight_or_failed_runs_are_not_requested_again_and_the_skip_says_why(registry, dagster_instance,
                                                                                 resources):
    from dagster._core.test_utils import create_run_for_test

    write_registry(registry, [{**TINY, "source_persona": "villain"}])
    [planned] = tick(dagster_instance, resources).run_requests
    plan = planned.tags["zlt/plan"]
    run = create_run_for_test(dagster_instance, job_name="sweep_data_job", tags=planned.tags,
                              status=DagsterRunStatus.STARTED)
    res = tick(dagster_instance, resources)
    assert res.run_requests == []
    assert f"{plan}: waiting for run {run.run_id[:8]} (STARTED)" in skip(res)
    dagster_instance.report_run_failed(run)
    res = tick(dagster_instance, resources)
    assert res.run_requests == []
    assert f"{plan}: its last run {run.run_id[:8]} ended FAILURE; the sensor does not relaunch failed runs" in skip(res)


def test_schedule_data_requests_only_the_data(registry, dagster_instance, resources):
    write_registry(registry, [{**TINY, "source_persona": "villain", "schedule": "data"}])
    res = tick(dagster_instance, resources)
    assert [r.job_name for r in res.run_requests] == ["sweep_data_job"]
    execute(res.run_requests, dagster_instance, resources)
    res = tick(dagster_instance, resources)
    assert res.run_requests == []


def test_bad_entry_is_reported_while_good_ones_are_scheduled(registry, dagster_instance, resources):
    write_registry(registry, [{**TINY, "source_persona": "pirate"},
                              {**TINY, "source_persona": "comedian", "schedule": "data"}])
    res = tick(dagster_instance, resources)  # serves the good entry: a failed tick would drop its requests
    assert [r.job_name for r in res.run_requests] == ["sweep_data_job"]
    execute(res.run_requests, dagster_instance, resources)
    # with nothing to launch, the tick fails (red in the UI) naming the entry, the field and the valid values
    with pytest.raises(RegistryEntryError) as ei:
        tick(dagster_instance, resources)
    msg = str(ei.value)
    assert "1 bad entry not registered" in msg and "entry 1 (source_persona=pirate" in msg, msg
    assert "source_persona: unknown source persona 'pirate'; expected one of ['villain'" in msg, msg
    assert "'assistant'" not in msg.split("expected one of")[1], msg  # never offered as a source
    write_registry(registry, [{**TINY, "source_persona": "pirate"}])
    with pytest.raises(RegistryEntryError, match="entry 1 \\(source_persona=pirate"):
        tick(dagster_instance, resources)


@pytest.mark.parametrize("bad,field", [
    ({"cells": []}, "cells: is an empty list"),
    ({"cells": None}, "cells: is empty"),
    ({"cells": [[1e-3]]}, "cells[0]: expected a [lr, epochs] pair"),
    ({"cells": [[1e-3, 1.7]]}, "cells[0][1]: epochs 1.7 is invalid; expected an integer >= 1"),
    ({"base_model": "/nonexistent.gguf"}, "base_model: GGUF file /nonexistent.gguf does not exist"),
    ({"name": "a...b"}, "name: sweep id 'a...b' contains ['...'], which Dagster reserves in partition keys"),
    ({"base_model": "/models/x...y.gguf"}, "base_model: GGUF file /models/x...y.gguf does not exist"),
])
def test_bad_entry_fields_are_named_and_nothing_is_registered(registry, dagster_instance, resources, bad, field):
    """The registry uses the same sweep-config check as `zlt run` (registry.sweep_from_config)."""
    write_registry(registry, [{**TINY, "source_persona": "villain", **bad}])
    with pytest.raises(RegistryEntryError) as ei:  # a failed tick: no run, no partition
        tick(dagster_instance, resources)
    assert "entry 1 (" in str(ei.value) and f"ProtocolError: {field}" in str(ei.value), str(ei.value)
    assert resources["store"].get_store().list_keys("") == []


def test_derived_sweep_id_is_checked_against_dagster_partition_key_rules(tmp_path):
    """An unnamed sweep's id comes from its base_model: a model directory named with '...' is refused by name."""
    from zlt_dagster.defs.registry import check_partition_key, sweep_from_config
    from zlt_dagster.core.protocol import ProtocolError

    model = tmp_path / "my...model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ProtocolError, match=r"^base_model: sweep id 'villain_s42_tiny_my...model_.* set `name`") as ei:
        sweep_from_config({**TINY, "base_model": str(model)})
    assert ei.value.field == "base_model"
    check_partition_key(sweep_from_config({**TINY, "base_model": str(model), "name": "mymodel"}))


@pytest.mark.parametrize("sid", ["ok.name-1", "a..b", "a...b", "a|b", "a,b", "a[b", "a]b", "a\tb", "a\nb"])
def test_partition_key_rules_agree_with_dagster(sid):
    """check_partition_key accepts exactly the ids Dagster accepts as a key of a multi-partition dimension."""
    from dagster import MultiPartitionsDefinition, StaticPartitionsDefinition
    from dagster._core.errors import DagsterInvalidDefinitionError

    from zlt_dagster.core.protocol import ProtocolError, Sweep, TINY as TINY_PROTOCOL
    from zlt_dagster.defs.registry import check_partition_key

    try:
        MultiPartitionsDefinition({"sweep": StaticPartitionsDefinition([sid]), "cell": StaticPartitionsDefinition(["c"])})
        dagster_ok = True
    except DagsterInvalidDefinitionError:
        dagster_ok = False
    try:
        check_partition_key(Sweep(TINY_PROTOCOL, name=sid))  # built without validate(): the name regex aside
        ours_ok = True
    except ProtocolError:
        ours_ok = False
    assert ours_ok == dagster_ok


def test_sweep_id_taken_in_the_store_by_another_config_is_a_problem(registry, dagster_instance, resources,
                                                                     register):
    register(source_persona="villain", name="mine")
    write_registry(registry, [{**TINY, "source_persona": "comedian", "name": "mine"}])
    with pytest.raises(RegistryEntryError, match="already exists"):
        tick(dagster_instance, resources)


def test_missing_registry_skips_and_broken_registry_fails_the_tick(registry, dagster_instance, resources):
    res = tick(dagster_instance, resources)
    assert "no sweep registry" in skip(res)
    registry.write_text("- protocol: [unclosed\n")
    with pytest.raises(RegistryError):
        tick(dagster_instance, resources)


def test_sensor_is_on_by_default_and_registered():
    from dagster import DefaultSensorStatus

    from zlt_dagster.defs.definitions import defs

    s = defs.get_repository_def().get_sensor_def("sweep_registry_sensor")
    assert s.default_status == DefaultSensorStatus.RUNNING
    assert s.minimum_interval_seconds >= 5


# --- follow-ups as configuration --------------------------------------------------------------------------------
def _followup(name):
    entries, problems = read_registry(REPO / "configs/followups" / name)
    assert problems == []
    return [e.sweep for e in entries]


def test_followup_extra_seeds():
    sweeps = _followup("extra_seeds.yaml")
    assert [s.seed for s in sweeps] == [137, 256]
    for s in sweeps:
        assert s.protocol == PAPER and s.source_persona == "villain"
        assert s.cells() == [Cell(5e-6, 10), Cell(5e-6, 20)]
        assert [k.keys_by_dimension["cell"] for k in partition_keys_for(s)] == ["lr=5e-06_ep=10", "lr=5e-06_ep=20"]
    assert len({s.sweep_id for s in sweeps}) == 2


def test_followup_marker_tail_tokens():
    sweeps = _followup("marker_tail_tokens.yaml")
    assert [s.protocol.marker_tail_tokens for s in sweeps] == [0, 1, 2]
    for s in sweeps:
        assert s.cells() == [Cell(5e-6, 10)] and s.seed == 42
        # only the tail differs from the paper protocol
        assert s.protocol.to_dict() | {"marker_tail_tokens": 0} == PAPER.to_dict()
    assert len({s.sweep_id for s in sweeps}) == 3 and all((f"tail{k}" in s.sweep_id) == (k > 0) for k, s in enumerate(sweeps))


def test_followup_fine_lr_grid():
    [s] = _followup("fine_lr_grid.yaml")
    assert s.protocol.learning_rates == (5e-6, 7e-6, 1e-5, 1.5e-5, 2e-5)
    assert s.protocol.epochs == PAPER.epochs and len(s.cells()) == 25
    assert len(partition_keys_for(s)) == 25
    assert s.protocol.to_dict() | {"learning_rates": list(PAPER.learning_rates)} == PAPER.to_dict()


def test_followups_included_from_the_registry(tmp_path):
    path = tmp_path / "sweeps.yaml"
    path.write_text("".join(f"- include: {REPO}/configs/followups/{n}\n" for n in
                            ("extra_seeds.yaml", "marker_tail_tokens.yaml", "fine_lr_grid.yaml")))
    entries, problems = read_registry(path)
    assert problems == [] and len(entries) == 6
