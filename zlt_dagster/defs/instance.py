"""The one local Dagster instance configuration, and which file `zlt` reads it from (the file `dagster dev` reads).

Which file applies (Dagster's own rule, which `zlt` follows so both always see the same runs and limits):
  - DAGSTER_HOME set:   $DAGSTER_HOME/dagster.yaml, for `dagster dev`, the daemon and `zlt`. If it does not exist,
                        `zlt` writes it from `instance_config(home)` (absolute paths). A file `zlt` wrote earlier
                        with other settings (e.g. one without the run-queue limit) is rewritten; a file a person
                        wrote is used as it is.
  - DAGSTER_HOME unset: ./dagster.yaml of the directory you start from (the repo root), for `dagster dev` (which then
                        keeps only scratch files in a ./.tmp_dagster_home_* directory) and for `zlt`; both store
                        runs under ./.dagster_home. Outside a directory with a dagster.yaml, `zlt` falls back to
                        DAGSTER_HOME=./.dagster_home (written as above).
The repo's ./dagster.yaml is `instance_config(".dagster_home")` (tests/defs/test_instance.py checks), so the two
files a user can meet hold the same settings.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef

from .. import settings

DEFAULT_HOME = ".dagster_home"
# the header that marks a file as zlt's (rewritten when its settings change); kept word for word since the module
# moved to defs/, so files written before are still recognised
WRITTEN_BY_ZLT = "# written by `zlt` from zlt_dagster/instance.py (same settings as the repo's dagster.yaml)\n"
# 2 CPU cores or one GPU: one run at a time, the rest queue (Dagster's default would run 10 at once)
MAX_CONCURRENT_RUNS = 1


def instance_config(home: str | Path) -> dict:
    """The instance settings with SQLite storage and local artifacts under `home` (kept relative if given so)."""
    home = Path(home)
    return {
        "storage": {"sqlite": {"base_dir": str(home / "storage")}},
        "local_artifact_storage": {"module": "dagster._core.storage.root", "class": "LocalArtifactStorage",
                                   "config": {"base_dir": str(home)}},
        "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {"max_concurrent_runs": MAX_CONCURRENT_RUNS}},
        "telemetry": {"enabled": False},
    }


def write_instance_file(home: Path) -> Path:
    """$home/dagster.yaml = instance_config(home); returns the path."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    path.write_text(WRITTEN_BY_ZLT + yaml.safe_dump(instance_config(home.resolve()), sort_keys=False))
    return path


def resolve_instance(cwd: Path | None = None) -> tuple[Path, Path]:
    """(instance directory, the dagster.yaml that configures it) by the rule in the module docstring; writes the
    file where `zlt` owns it. Raises ValueError if DAGSTER_HOME is set but not absolute (Dagster requires it)."""
    cwd = cwd or Path.cwd()
    raw = settings.dagster_home() or ""
    if not raw and (cwd / "dagster.yaml").is_file():
        return (cwd / DEFAULT_HOME).resolve(), cwd / "dagster.yaml"
    home = Path(raw) if raw else (cwd / DEFAULT_HOME).resolve()
    if not home.is_absolute():
        raise ValueError(f"DAGSTER_HOME={raw!r} is not an absolute path (Dagster requires one)")
    path = home / "dagster.yaml"
    if not path.exists() or (path.read_text().startswith(WRITTEN_BY_ZLT)
                             and yaml.safe_load(path.read_text()) != instance_config(home.resolve())):
        write_instance_file(home)
    return home, path


def open_instance(cwd: Path | None = None):
    """The DagsterInstance `dagster dev` would use from `cwd` (see resolve_instance), and the file it read."""
    home, path = resolve_instance(cwd)
    home.mkdir(parents=True, exist_ok=True)
    return DagsterInstance.from_ref(InstanceRef.from_dir(str(home), config_dir=str(path.parent))), path
