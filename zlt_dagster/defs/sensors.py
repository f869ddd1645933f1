"""The sweep registry sensor: configs/sweeps.yaml -> registered sweeps, dynamic partitions and run requests.

On by default (DefaultSensorStatus.RUNNING). Every tick it reads the registry ($ZLT_SWEEP_REGISTRY, default
configs/sweeps.yaml, relative to the code location's working directory) and, for every valid entry:
  1. registers the sweep in the store (sweeps/<id>/sweep.json; a different config under the same id is an error)
     and adds its id to the `sweeps` and its cells to the `cells` dynamic partitions if the instance lacks them;
  2. requests what the sweep still needs, judged by committed artifacts that verify (registry.plan_runs; a torn or
     deleted artifact counts as missing): sweep_data_job (on-policy data + base ARC); once the on-policy data
     exists, one cell_job run per unfinished cell; once every cell is done, report_job (compiled results + heatmap).

Each step is requested with the tag zlt/plan=<sweep_id>:<cell key or job>. Before requesting it the sensor looks
at that step's runs in the instance: while one is in flight it waits; if the last one failed it does not relaunch it
(no retry loop: re-execute it from the UI); otherwise it requests it with a run key Dagster has not seen for this
sensor (`<sweep_id>:<cell key or job>`, then `...:rebuild<n>` with n = runs of that step so far). So a result
deleted after it was built (one cell, or the whole artifact root with the Dagster instance kept) is rebuilt, where a
fixed run key would make Dagster drop the request forever. A tick that requests nothing says why in its skip
reason: each sweep complete, waiting for a run, a failed run, or a bad entry.

Why a sensor and not declarative automation (AutomationCondition.missing() / eager()), evaluated on dagster 1.13:
those conditions judge "missing" by the instance's materialization records, not by the artifact store, so an
artifact deleted or torn in the store still counts as materialized and would never be rebuilt; they would also
request every cell key of the instance for a sweep that chose a few cells (or has another grid), and they cannot register a sweep
from a YAML file. The cells must wait for the sweep's on-policy data and the report for all cells; one sensor that
reads the store states this directly. Each stage waits for the next tick after the previous one finished (minimum
interval ZLT_REGISTRY_SENSOR_INTERVAL_S, default 30 s).

A bad entry is logged as an error naming the entry (file, position, persona/seed) and the field on every tick, and
the other entries are still processed. A tick that has nothing to launch then FAILS (red in the UI's tick list)
with an error naming each bad entry and field, so a typo never looks like a healthy "0 runs requested" tick; a
tick that launches runs for the healthy entries succeeds (a failed tick would drop them) and the next one fails.
A registry file that is not valid YAML fails the tick as well.
"""
from __future__ import annotations

import dataclasses

from dagster import (
    DagsterRunStatus, DefaultSensorStatus, MultiPartitionKey, RunRequest, RunsFilter, SensorEvaluationContext,
    SensorResult, sensor,
)

from .. import settings, steps
from .jobs import cell_job, report_job, sweep_data_job
from .partitions import CELL_DIM, SWEEP_DIM, add_requests
from .registry import CELL_JOB, PlannedRun, RegistryError, RegistryProblem, plan_runs, read_registry, registry_path
from .resources import ArtifactStore

SWEEP_TAG = "zlt/sweep"
PLAN_TAG = "zlt/plan"  # the step a run was requested for: <sweep_id>:<cell key or job> (PlannedRun.run_key)
INTERVAL_S = settings.get_int("ZLT_REGISTRY_SENSOR_INTERVAL_S", minimum=1)  # read when the definitions load
IN_FLIGHT = {DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
             DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING}
FAILED = {DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


def run_request(planned: PlannedRun, earlier_runs: int = 0) -> RunRequest:
    """The request for one planned step; `earlier_runs` = runs of that step already in the instance, so the run key
    is one Dagster has not used for this sensor (the first request keeps the plain key)."""
    if planned.job == CELL_JOB:
        key = MultiPartitionKey({SWEEP_DIM: planned.sweep_id, CELL_DIM: planned.cell})
    else:
        key = planned.sweep_id
    run_key = planned.run_key if not earlier_runs else f"{planned.run_key}:rebuild{earlier_runs}"
    return RunRequest(run_key=run_key, job_name=planned.job, partition_key=key,
                      tags={SWEEP_TAG: planned.sweep_id, PLAN_TAG: planned.run_key})


def decide(instance, planned: PlannedRun) -> tuple[RunRequest | None, str]:
    """(request, "") to launch a planned step, or (None, why not): a run of it is in flight, or its last run
    failed (the sensor never relaunches a failed run: that would loop; re-execute it from the UI)."""
    runs = instance.get_runs(filters=RunsFilter(tags={PLAN_TAG: planned.run_key}))  # newest first
    if runs and runs[0].status in IN_FLIGHT:
        return None, f"{planned.run_key}: waiting for run {runs[0].run_id[:8]} ({runs[0].status.value})"
    if runs and runs[0].status in FAILED:
        return None, (f"{planned.run_key}: its last run {runs[0].run_id[:8]} ended {runs[0].status.value}; the "
                      f"sensor does not relaunch failed runs (re-execute it from the UI)")
    return run_request(planned, len(runs)), ""


@sensor(jobs=[sweep_data_job, cell_job, report_job], minimum_interval_seconds=INTERVAL_S,
        default_status=DefaultSensorStatus.RUNNING,
        description="Registers the sweeps listed in configs/sweeps.yaml ($ZLT_SWEEP_REGISTRY) and launches what each "
                    "still lacks in the artifact store: on-policy data, then its cells, then compile + heatmap. "
                    "Verified results are never re-run; deleted or torn ones are rebuilt.")
def sweep_registry_sensor(context: SensorEvaluationContext, store: ArtifactStore):
    path = registry_path()
    if not path.is_file():
        return SensorResult(skip_reason=f"no sweep registry at {path.resolve()} (set ZLT_SWEEP_REGISTRY)")
    try:
        entries, problems = read_registry(path)
    except RegistryError as e:
        context.log.error(str(e))
        raise
    st = store.get_store()
    requests: list[RunRequest] = []
    notes: list[str] = []  # why a sweep got no request
    registered = []  # the sweeps whose ids and cells must be partitions
    for entry in entries:
        entry = dataclasses.replace(entry, sweep=steps.as_stored(st, entry.sweep))  # a legacy id stays
        sid = entry.sweep.sweep_id
        try:
            if steps.register_sweep(st, entry.sweep):
                context.log.info(f"registered new sweep {sid} from {entry.where}")
        except steps.StepError as e:
            problems.append(RegistryProblem(entry.where, str(e)))
            continue
        registered.append(entry.sweep)
        planned = plan_runs(st, entry)
        if not planned:
            notes.append(f"{sid}: complete ({len(entry.sweep.cells())} cells verified, report up to date)"
                         if entry.schedule == "full" else f"{sid}: data ready (schedule=data: launch cells from the UI)")
        for p in planned:
            request, why = decide(context.instance, p)
            if request is not None:
                requests.append(request)
                context.log.info(f"requesting {p.job} for {p.run_key} (run key {request.run_key})")
            else:
                notes.append(why)
    for problem in problems:
        context.log.error(f"sweep registry: {problem}")
    partition_requests = add_requests(context.instance, registered)
    if problems and not requests and not partition_requests:
        # a red "Failure" tick whose error names each bad entry and field: a grey skip looks like every healthy
        # tick. Only when this tick launches nothing, since a failed tick drops its requests: a tick that serves
        # the healthy entries succeeds (problems in its log) and the next one, with nothing to launch, fails.
        raise RegistryEntryError(path, problems, notes)
    skip = None
    if not requests:
        skip = f"{len(entries)} sweep(s) in {path}: nothing to launch"
        if notes:
            skip += ": " + "; ".join(notes)
    return SensorResult(run_requests=requests, dynamic_partitions_requests=partition_requests, skip_reason=skip)


class RegistryEntryError(Exception):
    """The registry has bad entries: raised by a tick that launches nothing else, so it shows as failed."""

    def __init__(self, path, problems: list[RegistryProblem], notes: list[str]):
        n = len(problems)
        msg = (f"sweep registry {path}: {n} bad entr{'y' if n == 1 else 'ies'} not registered (fix or remove "
               f"{'it' if n == 1 else 'them'}; the other entries are served): " + "; ".join(map(str, problems)))
        super().__init__(msg + (f". Other sweeps: {'; '.join(notes)}" if notes else ""))

ALL_SENSORS = [sweep_registry_sensor]
