"""Fixtures of the reliability tests: dummy AWS credentials, a loopback S3 server (moto), small helpers."""
from __future__ import annotations

import uuid

import pytest

from reliability_helpers import ACCESS_KEY, BUCKET, SECRET_KEY


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "ZLT_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_store(moto_url, aws_env):
    from zlt_dagster.storage import S3Store

    store = S3Store(BUCKET, prefix=f"t-{uuid.uuid4().hex[:10]}", endpoint_url=moto_url, connect_timeout=2,
                    read_timeout=10, max_attempts=2)
    store.create_bucket_if_missing()
    return store
