"""Retries and timeouts (issue 9): the GPU assets retry transient failures with backoff, bad input fails at once
(tests/reliability/test_bad_inputs.py), the production instance retries crashed runs and times out runs that
never start or run too long, and every step pod has a deadline.

Per-step limit: Dagster 1.13.27 has no per-op timeout; `dagster/max_runtime` is a RUN tag read by run monitoring
(dagster/_daemon/monitoring/run_monitoring.py), so a step's own limit is its Kubernetes Job's
activeDeadlineSeconds (zlt_dagster/defs/k8s_tags.py), which also counts the time a pod sits Pending."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from zlt_dagster import steps
from zlt_dagster.steps import layout
from zlt_dagster.steps.checkpoints import StoreCheckpoints
from zlt_dagster.core.protocol import Sweep, get_protocol

from reliability_helpers import report

ROOT = Path(__file__).resolve().parents[2]
GPU_ASSETS = {"onpolicy_data", "adapter", "completions", "arc_scores", "base_arc_scores"}
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def test_gpu_assets_retry_with_exponential_backoff():
    from dagster import Backoff

    from zlt_dagster.defs.assets import ALL_ASSETS

    policies = {a.op.name: a.op.retry_policy for a in ALL_ASSETS}
    for name in GPU_ASSETS:
        p = policies[name]
        assert p is not None and p.max_retries >= 1 and p.delay and p.delay > 0, name
        assert p.backoff == Backoff.EXPONENTIAL, name


def test_cpu_assets_retry_sooner_than_gpu_assets():
    """CPU steps fail transiently only on storage: every asset has a policy, CPU ones with a shorter first delay."""
    from dagster import Backoff

    from zlt_dagster.defs.assets import ALL_ASSETS, GPU_RETRY

    policies = {a.op.name: a.op.retry_policy for a in ALL_ASSETS}
    cpu = set(policies) - GPU_ASSETS
    assert cpu == {"marker_rates", "compiled_results", "heatmap", "cell_comparison"}
    for name in cpu:
        p = policies[name]
        assert p is not None and p.max_retries >= 1 and p.backoff == Backoff.EXPONENTIAL, name
        assert 0 < p.delay < GPU_RETRY.delay, name


def test_gpu_pods_get_time_to_checkpoint_after_sigterm(monkeypatch):
    """Kubernetes' default grace (30 s) is too short to finish a step and upload a ~1 GB 7B checkpoint."""
    import zlt_dagster.defs.k8s_tags as k8s_tags

    assert k8s_tags.GPU_OP_TAGS[k8s_tags.K8S_KEY]["pod_spec_config"]["termination_grace_period_seconds"] >= 120
    monkeypatch.setenv("ZLT_GPU_STEP_GRACE_S", "600")
    assert k8s_tags.gpu_step_config()["pod_spec_config"]["termination_grace_period_seconds"] == 600


def test_production_instance_retries_runs_and_times_them_out():
    inst = yaml.safe_load((ROOT / "dagster_prod" / "dagster.yaml").read_text())
    assert inst["run_retries"]["enabled"] and inst["run_retries"]["max_retries"] >= 1
    mon = inst["run_monitoring"]
    assert mon["enabled"]
    assert 0 < mon["start_timeout_seconds"] <= 3600  # a run worker that never starts (no node, bad image)
    assert 0 < mon["max_runtime_seconds"]            # a run that never ends
    from dagster._core.storage.tags import MAX_RUNTIME_SECONDS_TAG

    assert MAX_RUNTIME_SECONDS_TAG == "dagster/max_runtime"  # the per-run override a job/run may set


def test_every_step_pod_has_a_deadline():
    from zlt_dagster.defs.k8s_tags import CPU_OP_TAGS, GPU_OP_TAGS, K8S_KEY

    for tags in (GPU_OP_TAGS, CPU_OP_TAGS):
        assert tags[K8S_KEY]["job_spec_config"]["active_deadline_seconds"] > 0


def test_sigterm_in_a_dagster_step_is_retried_and_the_retry_resumes(tmp_path, monkeypatch):
    """A step pod's SIGTERM (eviction) inside a real Dagster run: the adapter step writes a checkpoint, fails with
    TrainingInterrupted (transient), the RetryPolicy retries it after its delay (20 s) and the retry resumes from
    the checkpoint instead of step 0."""
    from dagster import instance_for_test, materialize

    from zlt_dagster.defs.assets import ALL_ASSETS, adapter
    from zlt_dagster.defs.partitions import add_partitions, cell_of, partition_keys_for, split_partition_key
    from zlt_dagster.defs.resources import ArtifactStore, Compute
    from zlt_dagster.storage import LocalStore

    store = LocalStore(tmp_path / "store")
    sweep = Sweep(get_protocol("tiny", {"train": {"checkpoint_every_steps": 2}}), base_model="tiny").validate()
    steps.register_sweep(store, sweep)
    steps.run_onpolicy(store, sweep, steps.ComputeSettings(device="cpu"), log=lambda _m: None)
    key = partition_keys_for(sweep)[2]  # 1e-3 x 3 epochs
    cell = cell_of(sweep, split_partition_key(key)[1])

    real_push = StoreCheckpoints.push
    fired = []

    def push_then_evicted(self, path, step, reason):
        real_push(self, path, step, reason)
        if not fired:
            fired.append(step)
            os.kill(os.getpid(), signal.SIGTERM)  # the kubelet, right after the first checkpoint

    monkeypatch.setattr(StoreCheckpoints, "push", push_then_evicted)
    with instance_for_test() as instance:
        add_partitions(instance, sweep)
        t0 = time.perf_counter()
        res = materialize(ALL_ASSETS, selection=[adapter], partition_key=key, instance=instance,
                          resources={"store": ArtifactStore(kind="local", local_root=str(store.root)),
                                     "compute": Compute(device="cpu")}, run_config=QUIET, raise_on_error=False)
        wall = time.perf_counter() - t0
    kinds = [e.event_type_value for e in res.all_events]
    assert res.success, kinds
    assert kinds.count("STEP_UP_FOR_RETRY") == 1 and kinds.count("STEP_RESTARTED") == 1
    retry = next(e for e in res.all_events if e.event_type_value == "STEP_UP_FOR_RETRY")
    assert retry.event_specific_data.error.cause.cls_name == "TrainingInterrupted"
    rec = json.loads(store.read_artifact_file(layout.cell_prefix(sweep.sweep_id, cell, "adapter"), "train_run.json"))
    assert fired == [2] and rec["resumed_from_step"] == 2 and rec["segments"] == 2
    assert store.list_keys(layout.checkpoint_prefix(sweep.sweep_id, cell)) == []
    report("dagster_sigterm_retry", retries=1, resumed_from_step=2, steps=rec["steps"], wall_s=round(wall, 1))
