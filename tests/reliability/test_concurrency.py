"""Two writers of the same artifact (two runs of one cell at once) cannot corrupt each other (issue 9).

Commits hold a lease on `<prefix>/.lock` (conditional create / If-Match renew+release); training holds a lease on
`cells/<cell>/.train.lock`. Without commit leases, a slow writer's manifest can end up listing files a fast writer
has overwritten meanwhile: the negative control below shows exactly that torn state, deterministically."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from zlt_dagster import steps
from zlt_dagster.steps import layout
from zlt_dagster.core.protocol import Cell, Sweep, get_protocol
from zlt_dagster.storage import LocalStore
from zlt_dagster.storage.base import LOCK_NAME, MANIFEST_NAME, LeaseHeldError, LeaseLostError

from reliability_helpers import manifest_writers, report

FILES = ("adapter_config.json", "adapter_model.safetensors", "train_run.json")


def _content(writer: str, rnd: int) -> dict[str, bytes]:
    return {name: f"{writer}:{rnd}:{name}:".encode() * (50 + rnd) for name in FILES}


def _verify(store, prefix: str) -> str:
    """'ok:<writer>' if the artifact verifies against ONE read of its manifest; 'torn' if its manifest lists a file
    that does not verify (or is gone); 'absent' if there is no manifest."""
    writers = manifest_writers(store, prefix)
    if isinstance(writers, str):
        return writers
    assert len(writers) == 1, writers  # one manifest only ever lists one writer's hashes
    return f"ok:{writers.pop()}"


class SlowWrites(LocalStore):
    """put_bytes sleeps per writer thread (by thread name), to force a given interleaving."""
    delays: dict[str, float] = {}

    def put_bytes(self, key, data):
        time.sleep(self.delays.get(threading.current_thread().name, 0.0))
        super().put_bytes(key, data)


def _race(store, prefix: str) -> str:
    """Writer A (slow: 0.3 s before each file) starts; writer B (fast) starts 0.4 s later, i.e. after A wrote its
    first file and before its second: without leases B overwrites A's first file and A's manifest comes last."""
    SlowWrites.delays = {"A": 0.3, "B": 0.0}
    errors = []

    def commit(writer):
        try:
            store.commit_bytes_artifact(prefix, _content(writer, 0))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    a = threading.Thread(target=commit, args=("A",), name="A")
    b = threading.Thread(target=commit, args=("B",), name="B")
    a.start()
    time.sleep(0.4)
    b.start()
    a.join(10)
    b.join(10)
    assert not errors, errors
    return _verify(store, prefix)


def test_negative_control_without_leases_a_slow_writer_tears_the_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("ZLT_STORE_LOCKS", "0")
    assert _race(SlowWrites(tmp_path), "sweeps/s/cells/c/adapter") == "torn"


def test_with_leases_the_second_writer_waits_and_the_artifact_is_whole(tmp_path):
    store = SlowWrites(tmp_path)
    assert _race(store, "sweeps/s/cells/c/adapter") == "ok:B"  # B committed after A, completely
    assert not store.exists(f"sweeps/s/cells/c/adapter/{LOCK_NAME}")


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.server)])
def test_many_concurrent_commits_of_one_prefix_never_tear(backend, tmp_path, request):
    store = LocalStore(tmp_path) if backend == "local" else request.getfixturevalue("s3_store")
    prefix = "sweeps/s/cells/lr=0.01_ep=1/adapter"
    writers, rounds = 4, 5
    errors, seen = [], {}
    stop = threading.Event()

    def write(w):
        for r in range(rounds):
            try:
                store.commit_bytes_artifact(prefix, _content(f"w{w}", r))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    def read():
        # a reader during the commits: an artifact it sees either verifies, or (a read overlapping the NEXT commit,
        # which deletes the manifest first and then replaces files) fails verification and is rejected
        while not stop.is_set():
            state = _verify(store, prefix)
            seen[state.split(":")[0]] = seen.get(state.split(":")[0], 0) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    reader = threading.Thread(target=read)
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    reader.join(10)
    wall = time.perf_counter() - t0
    assert not errors, errors[:3]
    final = _verify(store, prefix)
    assert final.startswith("ok:"), final
    keys = store.list_keys(prefix)
    assert sorted(keys) == sorted([f"{prefix}/{f}" for f in FILES] + [f"{prefix}/{MANIFEST_NAME}"])
    report(f"concurrent_commits_{backend}", writers=writers, commits=writers * rounds, final=final,
           reader_saw=seen, wall_s=round(wall, 2))


# --- the lease itself ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.server)])
def test_lease_is_exclusive_expires_and_is_taken_over(backend, tmp_path, request):
    store = LocalStore(tmp_path) if backend == "local" else request.getfixturevalue("s3_store")
    key = "sweeps/s/cells/c/.train.lock"
    with store.lease(key, ttl_s=30, purpose="first") as first:
        rec = json.loads(store.get_bytes(key))
        assert rec["owner"] == first.owner and rec["purpose"] == "first"
        t0 = time.perf_counter()
        with pytest.raises(LeaseHeldError, match=rf"is held by '{first.owner}' \(first\) until .* retry later"):
            store.lease(key, ttl_s=30, wait_s=0.6, poll_s=0.2).acquire()
        assert 0.5 < time.perf_counter() - t0 < 5
        first.check()
    assert not store.exists(key)  # released

    # an owner that died (SIGKILL: no release, no renewal) leaves its lease; it is taken over once expired
    dead = store.lease(key, ttl_s=1)
    dead.acquire()
    dead._stop.set()  # its heartbeat dies with it
    dead._thread.join()
    t0 = time.perf_counter()
    with store.lease(key, ttl_s=30, wait_s=10, poll_s=0.1) as heir:
        waited = time.perf_counter() - t0
        assert heir.taken_over_from["owner"] == dead.owner
        assert 0.3 < waited < 5
        with pytest.raises(LeaseLostError, match="expired"):
            dead.check()


def test_lease_renewal_keeps_it_and_a_takeover_is_detected(tmp_path):
    store = LocalStore(tmp_path)
    key = "p/.lock"
    lease = store.lease(key, ttl_s=0.6)
    lease.acquire()
    try:
        time.sleep(1.5)  # > 2 TTLs: only renewals keep it alive
        lease.check()
        assert lease.renewals >= 3
        # someone overwrites it (a takeover after a long stall): the next renewal notices, check() raises
        store.put_bytes(key, json.dumps({"owner": "other", "expires_at": time.time() + 60}).encode())
        time.sleep(0.5)
        with pytest.raises(LeaseLostError, match="another writer took it over"):
            lease.check()
    finally:
        lease.release()
    assert json.loads(store.get_bytes(key))["owner"] == "other"  # a lost lease is not deleted on release


def test_a_commit_whose_lease_was_lost_writes_no_manifest(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    prefix = "sweeps/s/cells/c/adapter"
    real_put = LocalStore.put_bytes

    def put(self, key, data):
        if key.endswith("adapter_model.safetensors"):  # mid-commit, another writer takes the lease over
            real_put(self, f"{prefix}/{LOCK_NAME}", json.dumps({"owner": "other", "expires_at": 0}).encode())
            time.sleep(store.lock_ttl_s / 3 + 0.3)  # let the heartbeat see it
        real_put(self, key, data)

    store.lock_ttl_s = 0.6
    monkeypatch.setattr(LocalStore, "put_bytes", put)
    with pytest.raises(LeaseLostError, match=r"\(commit sweeps/s/cells/c/adapter\) lost"):
        store.commit_bytes_artifact(prefix, _content("A", 0))
    assert not store.artifact_exists(prefix)


# --- two runs of one cell at once, as two processes ---------------------------------------------------------------
def test_two_trainers_of_one_cell_at_once(tmp_path):
    """Both succeed; the second waits for the first's training lease, then trains; the adapter is whole."""
    store = LocalStore(tmp_path / "store")
    sweep = Sweep(get_protocol("tiny", {"train": {"checkpoint_every_steps": 2}}), base_model="tiny").validate()
    steps.register_sweep(store, sweep)
    steps.run_onpolicy(store, sweep, steps.ComputeSettings(device="cpu"), log=lambda _m: None)
    cell = Cell(1e-2, 3)
    proc = Path(__file__).with_name("train_cell_proc.py")
    cmd = [sys.executable, str(proc), str(store.root), sweep.sweep_id, repr(cell.lr), str(cell.epochs),
           "--delay", "0.05", "--lease-ttl", "20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    wall = time.perf_counter() - t0
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("DONE steps=" in o for o in outs)
    prefix = layout.cell_prefix(sweep.sweep_id, cell, "adapter")
    manifest = store.read_manifest(prefix)
    for name in manifest["files"]:
        store.read_artifact_file(prefix, name)  # every file verifies
    assert [k for k in store.list_keys(layout.sweep_prefix(sweep.sweep_id)) if "/checkpoint/" in k or "lock" in k] == []
    report("two_trainers_one_cell", processes=2, both_succeeded=True, wall_s=round(wall, 1))
