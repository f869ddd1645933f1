"""Fault injection (issue 9): a tiny sweep runs against an S3 server (moto, loopback) behind a proxy that drops
connections (before and after the server applied the request), answers 500/503, stalls past the read timeout and
truncates response bodies. Every cell must end complete with valid checksums or failed with a clear StoreError;
no manifest may list a file that does not verify; a rerun without faults completes the rest."""
from __future__ import annotations

import json
import time
import uuid

import pytest

from zlt_dagster import steps
from zlt_dagster.steps import layout
from zlt_dagster.core.protocol import Sweep, get_protocol
from zlt_dagster.storage import S3Store, StoreError
from zlt_dagster.storage.base import LOCK_NAME, MANIFEST_NAME

from faultproxy import FaultProxy, random_schedule, with_outages
from reliability_helpers import BUCKET, report

pytestmark = pytest.mark.server
CELLS = ((1e-3, 1), (1e-2, 2), (3e-2, 1), (1e-1, 2))
STEPS = ("adapter", "completions", "marker_rates")


def _sweep() -> Sweep:
    return Sweep(get_protocol("tiny", {"train": {"checkpoint_every_steps": 2}}), base_model="tiny",
                 cells_subset=CELLS).validate()


def _run(store, sweep, compute, only=None) -> dict[str, str]:
    """What an orchestrator does: on-policy data, then per cell adapter -> completions -> marker rates; a failed
    step ends its cell (the error is kept). Returns {cell key: 'complete' | 'failed: <error>'}."""
    outcome = {}
    try:
        if not store.artifact_exists(layout.onpolicy_prefix(sweep.sweep_id)):
            steps.run_onpolicy(store, sweep, compute, log=lambda _m: None)
    except StoreError as e:
        return {c.key: f"failed: on-policy: {type(e).__name__}: {e}" for c in sweep.cells()}
    for cell in sweep.cells():
        if only is not None and cell.key not in only:
            continue
        try:
            for step in STEPS:
                if store.artifact_exists(layout.cell_prefix(sweep.sweep_id, cell, step)):
                    continue  # done in an earlier pass
                if step == "adapter":
                    steps.run_adapter(store, sweep, cell, compute, log=lambda _m: None)
                elif step == "completions":
                    steps.run_completions(store, sweep, cell, compute, log=lambda _m: None)
                else:
                    steps.run_marker_rates(store, sweep, cell)
            outcome[cell.key] = "complete"
        except StoreError as e:  # the only kind of error a storage fault may cause
            outcome[cell.key] = f"failed: {step}: {type(e).__name__}: {e}"
    return outcome


def _audit(clean, sweep) -> dict:
    """Every manifest under the sweep, checked through a fault-free client: its files must verify."""
    manifests = [k for k in clean.list_keys(layout.sweep_prefix(sweep.sweep_id)) if k.endswith("/" + MANIFEST_NAME)]
    torn = []
    for key in manifests:
        prefix = key[: -len(MANIFEST_NAME) - 1]
        m = clean.read_manifest(prefix)
        for name in m["files"]:
            try:
                clean.read_artifact_file(prefix, name)
            except StoreError as e:
                torn.append(f"{prefix}/{name}: {e}")
    locks = [k for k in clean.list_keys(layout.sweep_prefix(sweep.sweep_id)) if k.endswith(LOCK_NAME)]
    return {"manifests": len(manifests), "torn": torn, "orphan_locks": locks}


def test_tiny_sweep_through_a_faulty_s3(s3_server_url, aws_env, tmp_path):
    """Faults on 8% of the requests (3 attempts per request, boto's standard retry mode), plus an outage of 8
    consecutive requests every 150 (503 SlowDown), which makes whatever request it hits fail for good: some cells
    fail. Then a rerun without faults."""
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    clean = S3Store(BUCKET, prefix=prefix, endpoint_url=s3_server_url)
    clean.create_bucket_if_missing()
    sweep = _sweep()
    steps.register_sweep(clean, sweep)
    compute = steps.ComputeSettings(device="cpu", work_dir=str(tmp_path), lease_ttl_s=5)

    schedule = with_outages(random_schedule(rate=0.08, seed=9), every=150, length=8, first=60)
    with FaultProxy(s3_server_url, schedule, stall_s=2.0) as proxy:
        faulty = S3Store(BUCKET, prefix=prefix, endpoint_url=proxy.url, connect_timeout=1, read_timeout=1,
                         max_attempts=3)
        faulty.lock_ttl_s = 5  # a lease whose release was lost to a fault blocks its prefix for at most 5 s
        t0 = time.perf_counter()
        first = _run(faulty, sweep, compute)
        first_s = time.perf_counter() - t0
        counts = dict(proxy.counts)

    audit = _audit(clean, sweep)
    assert audit["torn"] == [], audit["torn"]
    failed = {k: v for k, v in first.items() if v != "complete"}
    by_key = {c.key: c for c in sweep.cells()}
    for key, outcome in first.items():
        if outcome == "complete":
            for step in STEPS:
                assert clean.artifact_exists(layout.cell_prefix(sweep.sweep_id, by_key[key], step)), (key, step)
        else:  # a clear error: which step, which object, which endpoint
            assert "s3://" in outcome and proxy.url in outcome, outcome
    for fault in ("500", "503", "drop", "drop_after", "stall", "truncate"):
        assert counts.get(fault, 0) >= 1, counts  # every kind of fault really happened

    # rerun without faults: the rest completes (an adapter resumes from its checkpoint where a pass died)
    t1 = time.perf_counter()
    second = _run(clean, sweep, compute)
    rerun_s = time.perf_counter() - t1
    assert set(second.values()) == {"complete"}, second
    assert steps.run_compile(clean, sweep)["n_cells"] == len(CELLS)
    audit2 = _audit(clean, sweep)
    assert audit2["torn"] == []
    # a lease whose release was lost to a fault, on an artifact the rerun had no reason to rewrite, stays behind
    # until a later writer takes it over: it only ever blocks its prefix until its expiry (5 s here)
    for key in audit2["orphan_locks"]:
        assert json.loads(clean.get_bytes(key))["expires_at"] < time.time(), key
    assert not [k for k in clean.list_keys(layout.sweep_prefix(sweep.sweep_id)) if "/checkpoint/" in k]
    resumed = {}
    for key, cell in by_key.items():
        rec = json.loads(clean.read_artifact_file(layout.cell_prefix(sweep.sweep_id, cell, "adapter"),
                                                  "train_run.json"))
        if rec.get("resumed_from_step"):
            resumed[key] = rec["resumed_from_step"]
    report("fault_injection", requests=counts.get("requests"), faults={k: v for k, v in counts.items()
                                                                     if k not in ("requests", "pass")},
           cells=len(CELLS), complete_first_pass=len(CELLS) - len(failed), failed_first_pass=len(failed),
           failures=[v[:200] for v in failed.values()], manifests_audited=audit["manifests"], torn=0,
           orphan_locks_after_first_pass=len(audit["orphan_locks"]),
           expired_orphan_locks_after_rerun=len(audit2["orphan_locks"]), resumed_in_rerun=resumed,
           first_pass_s=round(first_s, 1), rerun_s=round(rerun_s, 1), manifests_after_rerun=audit2["manifests"])
