"""Production executor: one Kubernetes pod per step, per-step resources from op tags."""
from __future__ import annotations

import os


def production_executor():
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured({
        "job_namespace": os.environ.get("ZLT_K8S_NAMESPACE", "zlt"),
        "max_concurrent": int(os.environ.get("ZLT_MAX_CONCURRENT_STEPS", "8")),
        "step_k8s_config": {"container_config": {"env_from": [{"secret_ref": {"name": "zlt-s3-credentials"}}]}},
    })
