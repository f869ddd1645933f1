"""S3-compatible servers that accept If-None-Match / If-Match and ignore them (issue 13).

The server is moto behind tests/reliability/faultproxy.py with ignore_conditions=True: every forwarded request loses
its conditional headers, as on older Ceph RGW releases and several gateways. On such a server the store's leases
exclude nobody, so two writers of one artifact tear it (negative control below). The store therefore probes each
endpoint + bucket once and refuses to run; with ZLT_STORE_LOCKS=0 the user opts into Dagster's run queue (one run per
partition, dagster_prod/dagster.yaml) as the only writer guard, and the queue serializes two runs of one cell."""
from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from zlt_dagster.defs.resources import ArtifactStore
from zlt_dagster.storage import S3Store
from zlt_dagster.storage.base import ConditionalWritesUnsupportedError

from faultproxy import FaultProxy
from reliability_helpers import BUCKET, WORK, manifest_writers, report

pytestmark = pytest.mark.server
REPO = Path(__file__).resolve().parents[2]
FILES = ("adapter_config.json", "adapter_model.safetensors", "train_run.json")


def _content(writer: str) -> dict[str, bytes]:
    return {name: f"{writer}:{name}:".encode() * 200 for name in FILES}


def _state(store, prefix: str) -> str:
    """'ok:<writer>' if every file matches ONE read of the manifest and comes from one writer, 'torn' otherwise,
    'absent' without a manifest."""
    writers = manifest_writers(store, prefix)
    if isinstance(writers, str):
        return writers
    return f"ok:{writers.pop()}" if len(writers) == 1 else "torn"


class SlowS3(S3Store):
    """put_bytes sleeps per writer thread (by thread name) to force an interleaving of two commits."""
    delays: dict[str, float] = {}

    def put_bytes(self, key, data):
        time.sleep(self.delays.get(threading.current_thread().name, 0.0))
        super().put_bytes(key, data)


@pytest.fixture
def ignoring_server(s3_server_url, aws_env):
    """(URL of a server that ignores conditional writes, a clean store on the real server for checks)."""
    with FaultProxy(s3_server_url, ignore_conditions=True) as proxy:
        clean = S3Store(BUCKET, prefix=f"cw-{uuid.uuid4().hex[:10]}", endpoint_url=s3_server_url)
        clean.create_bucket_if_missing()
        yield proxy, clean


def _behind(proxy, clean, cls=S3Store) -> S3Store:
    return cls(BUCKET, prefix=clean.prefix, endpoint_url=proxy.url, connect_timeout=2, read_timeout=10,
               max_attempts=2)


def _race(store, prefix: str, slow_first: float = 0.3, second_after: float = 0.4) -> str:
    """Writer A (slow before each file) starts; B (fast) starts `second_after` s later, between A's first and second
    file. Returns the final state of the artifact."""
    SlowS3.delays = {"A": slow_first, "B": 0.0}
    errors: list = []

    def commit(writer):
        try:
            store.commit_bytes_artifact(prefix, _content(writer))
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    a = threading.Thread(target=commit, args=("A",), name="A")
    b = threading.Thread(target=commit, args=("B",), name="B")
    a.start()
    time.sleep(second_after)
    b.start()
    a.join(30)
    b.join(30)
    assert not errors, errors
    return _state(store, prefix)


def test_probe_passes_on_a_server_that_honours_conditional_writes(s3_store):
    s3_store.check_conditional_writes()
    assert s3_store.locks_enabled()
    assert s3_store.list_keys("") == []  # the probe key is deleted


def test_store_refuses_a_server_that_ignores_conditional_writes(ignoring_server, monkeypatch):
    proxy, clean = ignoring_server
    monkeypatch.delenv("ZLT_STORE_LOCKS", raising=False)
    resource = ArtifactStore(kind="s3", bucket=BUCKET, prefix=clean.prefix, endpoint_url=proxy.url)
    with pytest.raises(ConditionalWritesUnsupportedError) as ei:
        resource.get_store()
    msg = str(ei.value)
    assert msg.startswith(f"S3 server at endpoint {proxy.url} (bucket '{BUCKET}') ignores conditional writes: "
                          "a second PutObject of probe key")
    assert "set ZLT_STORE_LOCKS=0" in msg and "\n" not in msg
    assert proxy.conditions_dropped >= 2
    # a store built directly refuses at its first commit, before writing anything (the outcome is cached per
    # endpoint + bucket: probed once)
    requests = proxy.counts["requests"]
    with pytest.raises(ConditionalWritesUnsupportedError):
        _behind(proxy, clean).commit_bytes_artifact("sweeps/s/cells/c/adapter", _content("A"))
    assert proxy.counts["requests"] == requests
    assert clean.list_keys("") == []  # nothing written, probe key deleted


def test_torn_commits_with_and_without_the_probe(ignoring_server, monkeypatch):
    """Negative control: the code before the probe trusted the server, so two writers of one prefix both 'held' the
    commit lease and the artifact was torn; the probe refuses instead, so nothing is committed and nothing torn."""
    proxy, clean = ignoring_server
    monkeypatch.delenv("ZLT_STORE_LOCKS", raising=False)
    rounds = 10
    with monkeypatch.context() as m:  # as before the probe: leases believed
        m.setattr(S3Store, "check_conditional_writes", lambda self: None)
        store = _behind(proxy, clean, SlowS3)
        outcomes = [_race(store, f"race/{r}", slow_first=0.15, second_after=0.2) for r in range(rounds)]
    torn_without = outcomes.count("torn")
    assert torn_without >= 1, outcomes  # the forced interleaving tears the artifact
    refusing = _behind(proxy, clean, SlowS3)
    for writer in ("A", "B"):
        with pytest.raises(ConditionalWritesUnsupportedError):
            refusing.commit_bytes_artifact("refused", _content(writer))
    assert clean.list_keys("refused") == []
    report("torn_commits_on_a_server_ignoring_conditional_writes", rounds=rounds, torn_without_probe=torn_without,
           outcomes_without_probe=outcomes, commits_with_probe=0, torn_with_probe=0)


def _instance_overrides(per_partition_limit: bool) -> dict:
    """The production instance's run-queue limits (dagster_prod/dagster.yaml), optionally without the
    one-run-per-partition limit (negative control), with a launcher that does the test's work in threads."""
    concurrency = yaml.safe_load((REPO / "dagster_prod/dagster.yaml").read_text())["concurrency"]
    limits = concurrency["runs"]["tag_concurrency_limits"]
    assert {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits
    if not per_partition_limit:
        concurrency["runs"]["tag_concurrency_limits"] = [t for t in limits if t["key"] != "dagster/partition"]
    return {"run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"},
            "run_launcher": {"module": "reliability_helpers", "class": "ThreadRunLauncher"},
            "concurrency": concurrency}


def _two_queued_runs_of_one_cell(store, prefix: str, per_partition_limit: bool) -> dict:
    """Two queued runs of the same cell partition; each run's work is one commit of the cell's adapter (A slow, B
    starting 0.4 s after its run starts). The daemon's queue decides when each starts."""
    from dagster import DagsterRunStatus, instance_for_test
    from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
    from dagster._core.test_utils import create_run_for_test, create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import EmptyWorkspaceTarget
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

    SlowS3.delays = {"A": 0.3, "B": 0.0}
    spans: dict[str, list[float]] = {}
    tags = {"dagster/partition": "lr1_ep1|s1", "dagster/partition/cell": "lr1_ep1", "dagster/partition/sweep": "s1",
            "zlt/gpu": "true"}

    def work(writer: str):
        def run():
            threading.current_thread().name = writer
            spans[writer] = [time.monotonic()]
            if writer == "B":
                time.sleep(0.4)
            store.commit_bytes_artifact(prefix, _content(writer))
            spans[writer].append(time.monotonic())
        return run

    with instance_for_test(overrides=_instance_overrides(per_partition_limit)) as instance:
        origin = RemoteJobOrigin(RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("zlt_dagster"),
                                                        "__repository__"), "cell_job")
        runs = {w: create_run_for_test(instance, job_name="cell_job", tags=tags, status=DagsterRunStatus.QUEUED,
                                       remote_job_origin=origin)
                for w in ("A", "B")}
        for w, run in runs.items():
            WORK[run.run_id] = work(w)
        daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)
        max_in_progress = 0
        with create_test_daemon_workspace_context(EmptyWorkspaceTarget(), instance) as ctx:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                list(daemon.run_iteration(ctx))
                statuses = [instance.get_run_by_id(r.run_id).status for r in runs.values()]
                max_in_progress = max(max_in_progress, sum(s in (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED)
                                                           for s in statuses))
                if all(s in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE) for s in statuses):
                    break
                time.sleep(0.1)
            for t in instance.run_launcher.threads:
                t.join(30)
            final = [instance.get_run_by_id(r.run_id).status for r in runs.values()]
    assert final == [DagsterRunStatus.SUCCESS] * 2, final
    return {"state": _state(store, prefix), "max_in_progress": max_in_progress, "spans": spans}


def test_opt_in_mode_dagster_serializes_runs_of_one_cell_and_nothing_is_torn(ignoring_server, monkeypatch):
    proxy, clean = ignoring_server
    monkeypatch.setenv("ZLT_STORE_LOCKS", "0")  # the opt-in: no probe, no leases
    store = ArtifactStore(kind="s3", bucket=BUCKET, prefix=clean.prefix, endpoint_url=proxy.url).get_store()
    assert not store.locks_enabled()
    store = _behind(proxy, clean, SlowS3)

    out = _two_queued_runs_of_one_cell(store, "sweeps/s1/cells/c/adapter", per_partition_limit=True)
    (a0, a1), (b0, b1) = out["spans"]["A"], out["spans"]["B"]
    assert out["max_in_progress"] == 1 and (a1 <= b0 or b1 <= a0), out  # one run of the cell at a time
    assert out["state"].startswith("ok:"), out  # whole: the later run's artifact

    control = _two_queued_runs_of_one_cell(store, "sweeps/s1/cells/c2/adapter", per_partition_limit=False)
    assert control["max_in_progress"] == 2 and control["state"] == "torn", control  # without the queue limit
    report("opt_in_no_conditional_writes_dagster_queue", serialized=out["state"], max_in_progress=1,
           without_partition_limit=control["state"], control_max_in_progress=2)
