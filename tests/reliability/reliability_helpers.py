"""Constants and helpers shared by the reliability tests (importable by name, unlike conftest.py)."""
from __future__ import annotations

import json
import os

from loopback import ACCESS_KEY, SECRET_KEY, free_port  # noqa: F401  (re-exported for the reliability tests)

BUCKET = "zlt-reliability"


def report(name: str, **figures) -> None:
    """Figures for RELIABILITY.md: printed (see them with -s) and appended to $ZLT_RELIABILITY_LOG if set."""
    line = json.dumps({"test": name, **figures})
    print(line)
    if os.environ.get("ZLT_RELIABILITY_LOG"):
        with open(os.environ["ZLT_RELIABILITY_LOG"], "a") as fh:
            fh.write(line + "\n")


# --- a run launcher that does a test's work in a thread (the queued-run tests of test_conditional_writes.py) -------
from dagster._core.launcher import RunLauncher  # noqa: E402
from dagster._serdes import ConfigurableClass  # noqa: E402

WORK: dict = {}  # run_id -> callable: what the "run worker" of that run does (here: commit an artifact)


class ThreadRunLauncher(RunLauncher, ConfigurableClass):
    """Launches a run by calling WORK[run_id]() in a thread, then reports the run successful (or failed); stands in
    for the run worker a real launcher would start, so the daemon's queue decisions meet real, overlapping work."""

    def __init__(self, inst_data=None):
        self._inst_data = inst_data
        self.threads: list = []
        super().__init__()

    @property
    def inst_data(self):
        return self._inst_data

    @classmethod
    def config_type(cls):
        return {}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data)

    def launch_run(self, context) -> None:
        import threading

        from dagster import DagsterEvent, DagsterEventType

        run = context.dagster_run
        instance = self._instance

        def work():
            instance.report_dagster_event(DagsterEvent(DagsterEventType.RUN_START.value, job_name=run.job_name),
                                          run_id=run.run_id)
            try:
                WORK[run.run_id]()
            except Exception as e:  # noqa: BLE001 - the run fails, as a run worker would report it
                instance.report_run_failed(instance.get_run_by_id(run.run_id), message=repr(e))
                return
            instance.report_dagster_event(DagsterEvent(DagsterEventType.RUN_SUCCESS.value, job_name=run.job_name),
                                          run_id=run.run_id)

        t = threading.Thread(target=work, name=run.run_id[:8])
        self.threads.append(t)
        t.start()

    def terminate(self, run_id):
        raise NotImplementedError("ThreadRunLauncher cannot terminate runs")


def manifest_writers(store, prefix: str) -> set[str] | str:
    """The writers whose files ONE read of the artifact's manifest lists, each file verified against it; 'torn' if
    a listed file is gone or does not verify, 'absent' without a manifest. A writer tags its files
    b"<writer>:..." (the concurrency tests' content)."""
    from zlt_dagster.storage import NotFoundError
    from zlt_dagster.storage.base import sha256_bytes

    try:
        manifest = store.read_manifest(prefix)
    except NotFoundError:
        return "absent"
    writers = set()
    for name, expected in manifest["files"].items():
        try:
            data = store.get_bytes(f"{prefix}/{name}")
        except NotFoundError:
            return "torn"
        if sha256_bytes(data) != expected["sha256"]:
            return "torn"
        writers.add(data.split(b":")[0].decode())
    return writers
