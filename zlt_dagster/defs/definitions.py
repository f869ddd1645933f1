"""Definitions for the two deployments, chosen by environment, never by editing code.

ZLT_DEPLOYMENT=local (default): artifacts in a local directory (ZLT_ARTIFACT_ROOT, default .zlt/artifacts), the
    in-process executor (one process keeps one copy of the base model for all steps of a run), CPU or a local GPU.
ZLT_DEPLOYMENT=production: artifacts in S3-compatible storage (ZLT_S3_BUCKET, ZLT_S3_PREFIX, ZLT_S3_ENDPOINT_URL,
    AWS_REGION; credentials from the pod's environment / Secret), one Kubernetes pod per step (k8s_job_executor),
    GPU requests from each asset's op tags. Device cuda unless ZLT_DEVICE says otherwise (only tests set it).
"""
from __future__ import annotations

from dagster import Definitions, in_process_executor

from .. import settings

from .assets import ALL_ASSETS
from .jobs import ALL_JOBS
from .production import production_executor
from .resources import ArtifactStore, Compute
from .sensors import ALL_SENSORS

DEPLOYMENTS = settings.DEPLOYMENTS
deployment = settings.deployment


def local_resources() -> dict:
    return {
        "store": ArtifactStore(kind="local", local_root=settings.get("ZLT_ARTIFACT_ROOT")),
        "compute": Compute(device=settings.device("auto"),
                           generation_backend=settings.get("ZLT_GENERATION_BACKEND"),
                           arc_source=settings.get("ZLT_ARC_SOURCE"),
                           torch_threads=settings.torch_threads(),
                           train_compile=settings.get("ZLT_TRAIN_COMPILE"),
                           decode_compile=settings.get("ZLT_DECODE_COMPILE")),
    }


def production_resources() -> dict:
    return {
        "store": ArtifactStore(kind="s3", bucket=settings.get("ZLT_S3_BUCKET"), prefix=settings.get("ZLT_S3_PREFIX"),
                               endpoint_url=settings.get("ZLT_S3_ENDPOINT_URL"),
                               region_name=settings.get("AWS_REGION")),
        # ZLT_DEVICE exists for tests that run the production step path on a machine without a GPU
        # (tests/defs/test_production_step.py); a cluster leaves it unset and gets cuda
        "compute": Compute(device=settings.device("cuda"),
                           generation_backend=settings.get("ZLT_GENERATION_BACKEND"),
                           arc_source=settings.get("ZLT_ARC_SOURCE"),
                           # scratch in the system temp dir (TMPDIR=/tmp, the pod's emptyDir); a fixed /tmp/zlt
                           # does not exist in a fresh pod and tempfile does not create it (the adapter step
                           # failed with FileNotFoundError in tests/defs/test_production_step.py)
                           work_dir="", train_compile=settings.get("ZLT_TRAIN_COMPILE"),
                           decode_compile=settings.get("ZLT_DECODE_COMPILE")),
    }


def build_definitions(name: str | None = None) -> Definitions:
    # a bad setting (ZLT_TRACKING=mlfow, ZLT_DEVICE=gpu) fails the code location's load, naming the variable,
    # instead of every step that reads it (retried, after runs were requested)
    settings.validate()
    name = name or deployment()
    if name == "production":
        return Definitions(assets=ALL_ASSETS, jobs=ALL_JOBS, sensors=ALL_SENSORS, resources=production_resources(),
                           executor=production_executor())
    return Definitions(assets=ALL_ASSETS, jobs=ALL_JOBS, sensors=ALL_SENSORS, resources=local_resources(),
                       executor=in_process_executor)


defs = build_definitions()
