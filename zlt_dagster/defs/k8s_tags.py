"""Per-step Kubernetes requests, as `dagster-k8s/config` op tags on each asset.

k8s_job_executor builds one pod per step and reads these op tags for that step's pod (run-level tags do not reach
step pods: dagster-io/dagster#22865). Because they are op tags, every way a run starts (UI, backfill, sensor) gets
them. GPU steps ask for one nvidia.com/gpu (request = limit), tolerate the GPU taint and join the `zlt-gpu`
concurrency pool (the instance caps GPU steps across all runs at the number of GPUs, so no step pod is created
that the cluster cannot place); CPU-only steps (marker rates, compile, heatmap) ask for no GPU.

Every step Job also carries `activeDeadlineSeconds`: Kubernetes fails a Job whose deadline passes, *including the
time its pod sat Pending*, and the executor's health check then fails the step. A pod that can never be scheduled
(no GPU node, wrong taint) therefore fails the step after the deadline instead of hanging the run forever
(dagster-io/dagster#24595; k8s_job_executor has no step timeout of its own).

Harmless on the local executor: it ignores `dagster-k8s/config`, and the pool has no limit unless the instance
sets one. Sizes are read from the environment at import (ZLT_GPU_STEP_*, ZLT_CPU_STEP_*), so a cluster with
other GPU nodes is a deployment change, not a code change.
"""
from __future__ import annotations

from .. import settings

K8S_KEY = "dagster-k8s/config"
POOL_KEY = "dagster/concurrency_key"  # Dagster's op-level concurrency pool tag
GPU_POOL = "zlt-gpu"
GPU_RESOURCE = "nvidia.com/gpu"


def _resources(cpu: str, memory: str, gpu: int) -> dict:
    # memory request = limit (no overcommit of a pod that holds a GPU); CPU has no limit (no throttling)
    req = {"cpu": cpu, "memory": memory}
    lim = {"memory": memory}
    if gpu:
        req[GPU_RESOURCE] = str(gpu)
        lim[GPU_RESOURCE] = str(gpu)
    return {"requests": req, "limits": lim}


def gpu_step_config() -> dict:
    # 8 CPU / 64Gi / 1 GPU fits a 7B bf16 model + LoRA (≈15 GB weights in host RAM while loading) with room
    # for tokenization and vLLM's CPU-side buffers. /dev/shm is a memory emptyDir (counts against the limit):
    # torch and vLLM use shared memory; the 64 MiB container default is too small.
    return {
        "container_config": {
            "resources": _resources(settings.get("ZLT_GPU_STEP_CPU"), settings.get("ZLT_GPU_STEP_MEMORY"), 1),
            "volume_mounts": [{"name": "dshm", "mount_path": "/dev/shm"}],
        },
        "pod_spec_config": {
            # SIGTERM (eviction, preemption, node drain) makes training finish its optimizer step and commit a
            # checkpoint before exiting; Kubernetes' default 30 s before SIGKILL is too short for that at 7B. LoRA
            # r=32 on all linear layers of Qwen2.5-7B = 28 layers x 2.88M = 80.7M params; fp32 weights + AdamW's
            # two moments = 3 x 323 MB ~ 1 GB to write and upload (~20 s at 50 MB/s) after a step of <= 16 x 1024
            # tokens (~3 s at 5.8k tok/s on an H100). 180 s leaves a >4x margin.
            "termination_grace_period_seconds": int(settings.get("ZLT_GPU_STEP_GRACE_S")),
            "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
            "node_selector": {settings.get("ZLT_GPU_NODE_LABEL"): "true"},
            "volumes": [{"name": "dshm", "empty_dir": {"medium": "Memory",
                                                       "size_limit": settings.get("ZLT_GPU_STEP_SHM")}}],
        },
        # the slowest paper cell (lr=5e-6, 20 epochs) trains in ~45 min on an H200; 6 h leaves room for slower
        # GPUs and model download, and still bounds a pod stuck in Pending
        "job_spec_config": {"active_deadline_seconds": int(settings.get("ZLT_GPU_STEP_DEADLINE_S"))},
    }


def cpu_step_config() -> dict:
    return {
        "container_config": {"resources": _resources(settings.get("ZLT_CPU_STEP_CPU"),
                                                     settings.get("ZLT_CPU_STEP_MEMORY"), 0)},
        "job_spec_config": {"active_deadline_seconds": int(settings.get("ZLT_CPU_STEP_DEADLINE_S"))},
    }


GPU_OP_TAGS = {K8S_KEY: gpu_step_config(), POOL_KEY: GPU_POOL}
CPU_OP_TAGS = {K8S_KEY: cpu_step_config()}
