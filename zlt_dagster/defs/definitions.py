"""Definitions for the two deployments, chosen by environment, never by editing code.

ZLT_DEPLOYMENT=local (default): artifacts in a local directory (ZLT_ARTIFACT_ROOT, default .zlt/artifacts), the
    in-process executor (one process keeps one copy of the base model for all steps of a run), CPU or a local GPU.
ZLT_DEPLOYMENT=production: artifacts in S3-compatible storage (ZLT_S3_BUCKET, ZLT_S3_PREFIX, ZLT_S3_ENDPOINT_URL,
    AWS_REGION; credentials from the pod's environment / Secret), one Kubernetes pod per step (k8s_job_executor),
    GPU requests from each asset's op tags. Device cuda unless ZLT_DEVICE says otherwise (only tests set it).
"""
from __future__ import annotations

import os

from dagster import Definitions, in_process_executor

from .assets import ALL_ASSETS
from .jobs import ALL_JOBS
from .resources import ArtifactStore, Compute
from .sensors import ALL_SENSORS

DEPLOYMENTS = ("local", "production")


def deployment() -> str:
    name = os.environ.get("ZLT_DEPLOYMENT", "local")
    if name not in DEPLOYMENTS:
        raise ValueError(f"ZLT_DEPLOYMENT={name!r}; expected one of {DEPLOYMENTS}")
    return name


def local_resources() -> dict:
    return {
        "store": ArtifactStore(kind="local", local_root=os.environ.get("ZLT_ARTIFACT_ROOT", ".zlt/artifacts")),
        "compute": Compute(device=os.environ.get("ZLT_DEVICE", "auto"),
                           generation_backend=os.environ.get("ZLT_GENERATION_BACKEND", "auto"),
                           arc_source=os.environ.get("ZLT_ARC_SOURCE", ""),
                           torch_threads=int(os.environ.get("ZLT_TORCH_THREADS", "0")),
                           train_compile=os.environ.get("ZLT_TRAIN_COMPILE", "auto")),
    }


def production_resources() -> dict:
    return {
        "store": ArtifactStore(kind="s3", bucket=os.environ.get("ZLT_S3_BUCKET", ""),
                               prefix=os.environ.get("ZLT_S3_PREFIX", ""),
                               endpoint_url=os.environ.get("ZLT_S3_ENDPOINT_URL", ""),
                               region_name=os.environ.get("AWS_REGION", "")),
        # ZLT_DEVICE exists for tests that run the production step path on a machine without a GPU
        # (tests/defs/test_production_step.py); a cluster leaves it unset and gets cuda
        "compute": Compute(device=os.environ.get("ZLT_DEVICE", "") or "cuda",
                           generation_backend=os.environ.get("ZLT_GENERATION_BACKEND", "auto"),
                           arc_source=os.environ.get("ZLT_ARC_SOURCE", ""),
                           # scratch in the system temp dir (TMPDIR=/tmp, the pod's emptyDir); a fixed /tmp/zlt
                           # does not exist in a fresh pod and tempfile does not create it (the adapter step
                           # failed with FileNotFoundError in tests/defs/test_production_step.py)
                           work_dir="", train_compile=os.environ.get("ZLT_TRAIN_COMPILE", "auto")),
    }


def build_definitions(name: str | None = None) -> Definitions:
    name = name or deployment()
    if name == "production":
        from .production import production_executor

        return Definitions(assets=ALL_ASSETS, jobs=ALL_JOBS, sensors=ALL_SENSORS, resources=production_resources(),
                           executor=production_executor())
    return Definitions(assets=ALL_ASSETS, jobs=ALL_JOBS, sensors=ALL_SENSORS, resources=local_resources(),
                       executor=in_process_executor)


defs = build_definitions()
