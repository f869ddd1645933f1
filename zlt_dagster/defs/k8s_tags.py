"""Per-step Kubernetes requests, as `dagster-k8s/config` op tags on each asset.

k8s_job_executor builds one pod per step and reads these op tags for that step's pod (run-level tags do not reach
step pods: dagster-io/dagster#22865). GPU steps ask for one nvidia.com/gpu (request = limit) and tolerate the GPU
taint; CPU-only steps (compile, heatmap) ask for none. Harmless on the local executor."""
from __future__ import annotations

import os

K8S_KEY = "dagster-k8s/config"


def _resources(cpu: str, memory: str, gpu: int) -> dict:
    req = {"cpu": cpu, "memory": memory}
    lim = {"memory": memory}
    if gpu:
        req["nvidia.com/gpu"] = str(gpu)
        lim["nvidia.com/gpu"] = str(gpu)
    return {"requests": req, "limits": lim}


def gpu_step_config() -> dict:
    return {
        "container_config": {"resources": _resources(os.environ.get("ZLT_GPU_STEP_CPU", "8"),
                                                     os.environ.get("ZLT_GPU_STEP_MEMORY", "64Gi"), 1)},
        "pod_spec_config": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "node_selector": {os.environ.get("ZLT_GPU_NODE_LABEL", "nvidia.com/gpu.present"): "true"},
        },
    }


def cpu_step_config() -> dict:
    return {"container_config": {"resources": _resources("1", "4Gi", 0)}}


GPU_OP_TAGS = {K8S_KEY: gpu_step_config()}
CPU_OP_TAGS = {K8S_KEY: cpu_step_config()}
