"""The sweep registry sensor: configs/sweeps.yaml -> registered sweeps, dynamic partitions and run requests.

On by default (DefaultSensorStatus.RUNNING). Every tick it reads the registry ($ZLT_SWEEP_REGISTRY, default
configs/sweeps.yaml, relative to the code location's working directory) and, for every valid entry:
  1. registers the sweep in the store (sweeps/<id>/sweep.json; a different config under the same id is an error)
     and adds its key to the `sweeps` dynamic partitions if the instance lacks it;
  2. requests what the sweep still needs, judged by committed artifacts (registry.plan_runs): sweep_data_job
     (on-policy data + base ARC); once the on-policy data exists, one cell_job run per unfinished cell; once every
     cell is done, report_job (compiled results + heatmap).
Why a sensor and not declarative automation: the cells must wait for the sweep's on-policy data, the report for
all cells, and a sweep that already exists must get no run at all. One sensor that reads the store states this
directly, and its run keys (`<sweep_id>:<cell position or job>`) make each request at most once: a run that
fails is not relaunched in a loop (retry it from the UI), and a sweep whose artifacts exist gets nothing. Each
stage waits for the next tick after the previous one finished (minimum interval ZLT_REGISTRY_SENSOR_INTERVAL_S,
default 30 s).

A bad entry is logged as an error naming the entry (file, position, persona/seed) on every tick, and the other
entries are still processed; a tick with nothing to launch says so in its skip reason, bad entries included. A
registry file that is not valid YAML fails the tick (red in the UI).
"""
from __future__ import annotations

import os

from dagster import (
    DefaultSensorStatus, MultiPartitionKey, RunRequest, SensorEvaluationContext, SensorResult, sensor,
)

from .. import pipeline
from .jobs import cell_job, report_job, sweep_data_job
from .partitions import CELL_DIM, SWEEP_DIM, sweep_partitions
from .registry import CELL_JOB, PlannedRun, RegistryError, RegistryProblem, plan_runs, read_registry, registry_path
from .resources import ArtifactStore

SWEEP_TAG = "zlt/sweep"
INTERVAL_S = int(os.environ.get("ZLT_REGISTRY_SENSOR_INTERVAL_S", "") or 30)


def run_request(planned: PlannedRun) -> RunRequest:
    if planned.job == CELL_JOB:
        key = MultiPartitionKey({SWEEP_DIM: planned.sweep_id, CELL_DIM: planned.cell_position})
    else:
        key = planned.sweep_id
    return RunRequest(run_key=planned.run_key, job_name=planned.job, partition_key=key,
                      tags={SWEEP_TAG: planned.sweep_id})


@sensor(jobs=[sweep_data_job, cell_job, report_job], minimum_interval_seconds=INTERVAL_S,
        default_status=DefaultSensorStatus.RUNNING,
        description="Registers the sweeps listed in configs/sweeps.yaml ($ZLT_SWEEP_REGISTRY) and launches what each "
                    "still needs: on-policy data, then its cells, then compile + heatmap. Existing results are "
                    "never re-run.")
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
    new_partitions: list[str] = []
    requests: list[RunRequest] = []
    for entry in entries:
        sid = entry.sweep.sweep_id
        try:
            if pipeline.register_sweep(st, entry.sweep):
                context.log.info(f"registered new sweep {sid} from {entry.where}")
        except pipeline.PipelineError as e:
            problems.append(RegistryProblem(entry.where, str(e)))
            continue
        if not context.instance.has_dynamic_partition(sweep_partitions.name, sid) and sid not in new_partitions:
            new_partitions.append(sid)
        requests += [run_request(p) for p in plan_runs(st, entry)]
    for problem in problems:
        context.log.error(f"sweep registry: {problem}")
    partition_requests = [sweep_partitions.build_add_request(new_partitions)] if new_partitions else []
    skip = None
    if not requests:
        skip = f"{len(entries)} sweep(s) in {path}: nothing to launch"
        if problems:
            skip += f"; {len(problems)} bad entr{'y' if len(problems) == 1 else 'ies'}: " + "; ".join(map(str, problems))
    return SensorResult(run_requests=requests, dynamic_partitions_requests=partition_requests, skip_reason=skip)


ALL_SENSORS = [sweep_registry_sensor]
