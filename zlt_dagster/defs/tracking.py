"""External experiment tracking: which project/experiment name a tracker gets, decided once, said out loud.

Dagster's materialization metadata is the source of truth for every number; an external tracker (W&B or MLflow,
off by default) only mirrors it. The reference run lost 19 of 25 cells because the tracker's own environment
variable silently overrode the project name the script set. Here the name is resolved by ONE function with an
explicit order, the first value that is set wins:

  1. explicit run config   the run tag `zlt/tracking_project` (launchpad / backfill tags, or a sensor's request)
  2. ZLT_TRACKING_PROJECT  this project's environment variable (a deployment-wide name)
  3. the tracker's own     WANDB_PROJECT (wandb) or MLFLOW_EXPERIMENT_NAME (mlflow)
  4. default               "zlt-<sweep id>", so every run of a sweep lands together however it was launched

The decision, its source and every lower-precedence value it overrode are logged at the start of every step
(`ProjectChoice.describe`; at INFO the first time in a process, DEBUG after). Backends then (a) pass the name to
the tracker explicitly, (b) pin the tracker's own variable to the same value for the run, so a library that reads
it later agrees, and (c) read back the name the tracker actually used and fail before any work if it differs: a
run never lands somewhere else silently.

Tracker runs are opened around steps by the asset layer (`start_tracking`, first thing in every asset body); the
file backend needs no network and no extra package; mlflow and wandb are imported only when chosen.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .. import settings

log = logging.getLogger(__name__)

RUN_TAG = "zlt/tracking_project"
ZLT_ENV = "ZLT_TRACKING_PROJECT"
# the variable each tracker reads on its own when no name is passed (the one that caused the reference's loss)
TRACKER_ENV: dict[str, str | None] = {"off": None, "file": None, "wandb": "WANDB_PROJECT",
                                      "mlflow": "MLFLOW_EXPERIMENT_NAME"}
KINDS = settings.TRACKERS  # the values ZLT_TRACKING may take (settings.tracking checks them)
assert set(TRACKER_ENV) == set(KINDS), "a tracker without its project variable entry"
# W&B refuses these characters in project names and caps the length at 128; MLflow accepts them, but one rule for
# both keeps a name portable between trackers.
_BAD_CHARS = re.compile(r"[/\\#?%:]")
MAX_NAME = 128


class TrackingError(ValueError):
    """A tracking setting is wrong, or a tracker did not use the name it was given."""


@dataclass(frozen=True)
class ProjectChoice:
    value: str
    source: str                                     # e.g. "run tag zlt/tracking_project"
    overridden: tuple[tuple[str, str], ...] = ()    # (source, value) of lower-precedence settings that were set
    tracker: str = "off"

    def describe(self) -> str:
        s = f"tracking ({self.tracker}): project/experiment {self.value!r} from {self.source}"
        if self.overridden:
            s += "; overriding " + ", ".join(f"{src}={val!r}" for src, val in self.overridden)
        if self.tracker == "off":
            s += " (tracker off: Dagster metadata only; this is the name it would use)"
        return s


def default_project(sweep_id: str) -> str:
    name = f"zlt-{sweep_id}" if sweep_id else "zlt"
    return _BAD_CHARS.sub("-", name)[:MAX_NAME]


def check_name(value: str, source: str) -> str:
    if not value.strip() or value != value.strip():
        raise TrackingError(f"tracking project name {value!r} from {source} is blank or has surrounding spaces")
    if _BAD_CHARS.search(value) or len(value) > MAX_NAME:
        raise TrackingError(f"tracking project name {value!r} from {source} is invalid: at most {MAX_NAME} "
                            f"characters, none of / \\ # ? % :")
    return value


def resolve_project(tracker: str, sweep_id: str, *, run_tag: str | None = None,
                    env: Mapping[str, str] | None = None) -> ProjectChoice:
    """The single place the tracker's project/experiment name is decided (order in the module docstring).
    An empty string counts as unset. The tracker's own variable is consulted only for that tracker (the file
    backend and `off` have none)."""
    if tracker not in KINDS:
        raise TrackingError(f"tracking kind {tracker!r} is not one of {KINDS}")
    env = os.environ if env is None else env
    own_vars = [TRACKER_ENV[tracker]] if TRACKER_ENV[tracker] else []
    candidates: list[tuple[str, str | None]] = [(f"run tag {RUN_TAG}", run_tag), (f"env {ZLT_ENV}", env.get(ZLT_ENV))]
    candidates += [(f"env {var} (the tracker's own variable)", env.get(var)) for var in own_vars]
    candidates.append(("default from the sweep id", default_project(sweep_id)))
    chosen = [(src, val) for src, val in candidates if val]
    source, value = chosen[0]
    check_name(value, source)
    overridden = tuple((src.split(" (")[0], val) for src, val in chosen[1:]
                       if not src.startswith("default") and val != value)
    return ProjectChoice(value=value, source=source, overridden=overridden, tracker=tracker)


# --- backends -------------------------------------------------------------------------------------------------
def _numbers(metadata: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metadata.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class TrackerRun:
    """One tracker run per Dagster step. `log` mirrors a materialization's numbers; `finish` closes the run."""
    choice: ProjectChoice
    run_name: str
    _pinned: dict[str, str | None] = field(default_factory=dict)

    def log(self, metadata: Mapping[str, Any]) -> None:  # pragma: no cover - overridden
        pass

    def finish(self, status: str = "success") -> None:
        for var, old in self._pinned.items():
            if old is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = old
        self._pinned = {}

    def _pin_env(self) -> None:
        """Set the tracker's own variable to the chosen name for this run, so any code that reads it later (a
        trainer callback, a library default) agrees with the decision instead of silently diverging."""
        var = TRACKER_ENV[self.choice.tracker]
        if var:
            self._pinned[var] = os.environ.get(var)
            os.environ[var] = self.choice.value


class NullRun(TrackerRun):
    def log(self, metadata: Mapping[str, Any]) -> None:
        pass


class FileRun(TrackerRun):
    """No network, no package: <root>/<project>/<run_name>.jsonl with a start record (the name decision), one
    record per mirrored materialization and an end record. A run without an end record did not finish."""

    def __init__(self, choice: ProjectChoice, run_name: str, root: str | Path, config: Mapping[str, Any]):
        super().__init__(choice, run_name)
        self.path = Path(root) / choice.value / f"{_BAD_CHARS.sub('-', run_name)}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write({"event": "start", "project": choice.value, "source": choice.source,
                     "overridden": [list(o) for o in choice.overridden], "config": dict(config)})

    def _write(self, rec: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"time": time.time(), **rec}, default=str) + "\n")

    def log(self, metadata: Mapping[str, Any]) -> None:
        self._write({"event": "metrics", "metrics": _numbers(metadata),
                     "labels": {k: v for k, v in metadata.items() if isinstance(v, str)}})

    def finish(self, status: str = "success") -> None:
        self._write({"event": "end", "status": status})
        super().finish(status)


def _import_tracker(module: str, package: str):
    """Trackers are optional packages (the `tracking` extra), imported only when chosen."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TrackingError(f"tracking kind {module!r} needs the {package} package "
                            f"(pip install {package}, or the project's `tracking` extra)") from e


class MlflowRun(TrackerRun):
    def __init__(self, choice: ProjectChoice, run_name: str, uri: str, config: Mapping[str, Any], mlflow=None):
        super().__init__(choice, run_name)
        self.mlflow = mlflow = mlflow or _import_tracker("mlflow", "mlflow-skinny")
        if uri:
            mlflow.set_tracking_uri(uri)
        stale = mlflow.active_run()
        if stale is not None:
            # a run left open in this process by a step that crashed before it could close it: start_run would
            # refuse to start another; close it as failed, and say so
            log.warning("mlflow: closing run %s left open in this process as FAILED", stale.info.run_id)
            mlflow.end_run(status="FAILED")
        self._pin_env()
        exp = mlflow.set_experiment(choice.value)
        # the experiment id is passed explicitly: start_run then never falls back to MLFLOW_EXPERIMENT_NAME
        self.run = mlflow.start_run(experiment_id=exp.experiment_id, run_name=run_name)
        if self.run.info.experiment_id != exp.experiment_id:
            self.finish("failed")
            raise TrackingError(f"mlflow started run {run_name!r} in experiment {self.run.info.experiment_id}, not "
                                f"in {choice.value!r} ({exp.experiment_id}) as decided ({choice.source})")
        mlflow.log_params({k: v for k, v in config.items() if isinstance(v, (str, int, float, bool))})

    def log(self, metadata: Mapping[str, Any]) -> None:
        self.mlflow.log_metrics(_numbers(metadata))

    def finish(self, status: str = "success") -> None:
        if getattr(self, "run", None) is not None:
            self.mlflow.end_run(status="FINISHED" if status == "success" else "FAILED")
            self.run = None
        super().finish(status)


class WandbRun(TrackerRun):
    def __init__(self, choice: ProjectChoice, run_name: str, config: Mapping[str, Any], wandb=None):
        super().__init__(choice, run_name)
        self.wandb = wandb = wandb or _import_tracker("wandb", "wandb")
        self._pin_env()
        self.run = wandb.init(project=choice.value, name=run_name, config=dict(config))
        if self.run.project != choice.value:
            used = self.run.project
            self.finish("failed")
            raise TrackingError(f"wandb put run {run_name!r} in project {used!r}, not {choice.value!r} as decided "
                                f"({choice.source}); refusing to track into the wrong project")

    def log(self, metadata: Mapping[str, Any]) -> None:
        self.run.log(_numbers(metadata))

    def finish(self, status: str = "success") -> None:
        if getattr(self, "run", None) is not None:
            self.run.finish(exit_code=0 if status == "success" else 1)
            self.run = None
        super().finish(status)


def open_run(choice: ProjectChoice, run_name: str, config: Mapping[str, Any] | None = None, *,
             file_root: str | Path = ".zlt/tracking", uri: str = "") -> TrackerRun:
    config = config or {}
    if choice.tracker == "off":
        return NullRun(choice, run_name)
    if choice.tracker == "file":
        return FileRun(choice, run_name, file_root, config)
    if choice.tracker == "mlflow":
        return MlflowRun(choice, run_name, uri, config)
    return WandbRun(choice, run_name, config)


# --- external tracking (off by default; Dagster metadata stays the source of truth) -----------------------------
# Settings come from the environment so every way a step runs (UI, backfill, sensor, CLI, tests) sees the same:
#   ZLT_TRACKING=off|file|mlflow|wandb   ZLT_TRACKING_DIR (file backend, default .zlt/tracking)
#   ZLT_TRACKING_URI (mlflow tracking URI)   the project name: this module (run tag > ZLT_TRACKING_PROJECT >
#   WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME > "zlt-<sweep id>")
class TrackedStep:
    """Returned by `start_tracking`; call it on the step's MaterializeResult to mirror the numbers and close the
    tracker run. With a tracker on, the result's metadata also records where it was mirrored."""

    def __init__(self, run, choice):
        self.run, self.choice = run, choice

    def __call__(self, result):
        self.run.log(result.metadata or {})
        self.run.finish("success")
        if self.choice.tracker == "off":
            return result
        return result._replace(metadata={**(result.metadata or {}), "tracking_project": self.choice.value,
                                         "tracking_source": self.choice.source})

    def fail(self) -> None:
        """The step failed: close the tracker run as failed (an MLflow run left open in an in-process executor
        would make the next step's start_run fail)."""
        self.run.finish("failed")


_SAID: set = set()  # (ProjectChoice, sweep id) already logged at INFO by this process


def start_tracking(context, sweep_id: str, cell_key: str = "") -> TrackedStep:
    """First thing in every asset step: decide the tracker's project name, log the decision and its source (and
    what it overrode), open the tracker run. A tracker that cannot honour the name fails the step here, before
    any compute."""
    choice = resolve_project(settings.tracking(), sweep_id,
                                      run_tag=context.run.tags.get(RUN_TAG))
    # Every step's event log records the decision, but a process says it at INFO only the first time: `zlt run`
    # (one process, every step of a sweep in-process) printed the same line ~4 times per cell. A step pod is a
    # process of its own, so it still says it at INFO.
    said = (choice, sweep_id)
    (context.log.debug if said in _SAID else context.log.info)(choice.describe())
    _SAID.add(said)
    step = context.asset_key.to_user_string()
    run_name = f"{sweep_id}.{cell_key or 'sweep'}.{step}.{context.run.run_id[:8]}"
    config = {"sweep_id": sweep_id, "cell": cell_key, "asset": step, "dagster_run_id": context.run.run_id}
    run = open_run(choice, run_name, config, file_root=settings.get("ZLT_TRACKING_DIR"),
                            uri=settings.get("ZLT_TRACKING_URI"))
    return TrackedStep(run, choice)
