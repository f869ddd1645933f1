"""Production executor: one Kubernetes Job (one pod) per step, configured for the `zlt` namespace.

What a step pod gets, and from where (dagster_k8s merges them in this order, later wins, lists are concatenated
and de-duplicated):
1. the run launcher's config (instance dagster.yaml / Helm values: image pull, the instance's env and volumes);
2. this executor's config (`executor_config()`): namespace, a service account WITHOUT Kubernetes API rights
   (`zlt-step`, token not mounted: a step only talks to S3 and PostgreSQL), env from the `zlt-config` ConfigMap
   and the `zlt-s3-credentials` Secret, the `restricted` Pod Security Standard for pod and container, a
   writable /tmp emptyDir under a read-only root filesystem;
3. the op's `dagster-k8s/config` tag (k8s_tags.py): GPU or CPU resources, toleration, step deadline.
Run-level `dagster-k8s/config` tags are NOT used for steps (dagster-io/dagster#22865).

All names come from the environment (ZLT_K8S_*), so another namespace is a deployment change, not a code change.
"""
from __future__ import annotations

from .. import settings

RUN_AS_USER = 10001  # the image's non-root user (docker/Dockerfile)


def namespace() -> str:
    return settings.get("ZLT_K8S_NAMESPACE")


def step_service_account() -> str:
    return settings.get("ZLT_K8S_STEP_SERVICE_ACCOUNT")


def s3_secret_name() -> str:
    return settings.get("ZLT_K8S_S3_SECRET")


def config_map_name() -> str:
    return settings.get("ZLT_K8S_CONFIG_MAP")


def pod_security_context() -> dict:
    """Pod-level half of the `restricted` Pod Security Standard."""
    return {"run_as_non_root": True, "run_as_user": RUN_AS_USER, "run_as_group": RUN_AS_USER,
            "fs_group": RUN_AS_USER, "seccomp_profile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict:
    """Container-level half: no privilege escalation, no capabilities, read-only root (writes go to /tmp)."""
    return {"allow_privilege_escalation": False, "capabilities": {"drop": ["ALL"]},
            "read_only_root_filesystem": True, "run_as_non_root": True, "run_as_user": RUN_AS_USER,
            "seccomp_profile": {"type": "RuntimeDefault"}}


def tmp_volume() -> dict:
    # HOME, HF/torch/vLLM caches, the model download and adapters pulled from S3 all live under /tmp
    # (docker/Dockerfile sets the env); size it for a 7B model plus caches
    return {"name": "tmp", "empty_dir": {"size_limit": settings.get("ZLT_STEP_TMP_SIZE")}}


def executor_config() -> dict:
    """The k8s_job_executor config of the production Definitions (also used by tests to build step pods)."""
    return {
        "job_namespace": namespace(),
        "service_account_name": step_service_account(),
        "env_config_maps": [config_map_name()],
        "env_secrets": [s3_secret_name()],
        # per run; the cross-run cap on GPU steps is the `zlt-gpu` concurrency pool (instance config)
        "max_concurrent": settings.get_int("ZLT_MAX_CONCURRENT_STEPS", minimum=1),
        "security_context": container_security_context(),
        "step_k8s_config": {
            "container_config": {"volume_mounts": [{"name": "tmp", "mount_path": "/tmp"}]},
            "pod_spec_config": {"security_context": pod_security_context(),
                                "automount_service_account_token": False,
                                "volumes": [tmp_volume()]},
        },
    }


def production_executor():
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(executor_config(), name="zlt_k8s_job_executor")
