"""Fixtures: one `store` fixture that runs every contract test on LocalStore and on S3Store against a
real S3-compatible HTTP server (moto's ThreadedMotoServer on loopback)."""

from __future__ import annotations

import socket
import uuid

import pytest

from zlt_dagster.storage import LocalStore, S3Store

# Dummy credentials with distinctive values, so tests can assert they never leak into repr/errors.
TEST_ACCESS_KEY = "AKIAZLTTESTKEYID0001"
TEST_SECRET_KEY = "zlt-test-secret-DO-NOT-LEAK-0123456789abcdef"
TEST_BUCKET = "zlt-test-bucket"


def free_closed_port() -> int:
    """A loopback port that nothing listens on (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def leak_markers() -> tuple[str, str]:
    """The dummy credential values; they must never show up in any repr or error message."""
    return TEST_ACCESS_KEY, TEST_SECRET_KEY


@pytest.fixture
def closed_port() -> int:
    return free_closed_port()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Dummy credentials/region ONLY from the environment, isolated from any real AWS config."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "ZLT_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def s3_server_url():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_store(s3_server_url, aws_env) -> S3Store:
    """A fresh, empty namespace (unique prefix) in a bucket on the loopback S3 server."""
    store = S3Store(TEST_BUCKET, prefix=f"t-{uuid.uuid4().hex[:10]}/root", endpoint_url=s3_server_url,
                    connect_timeout=2, read_timeout=10, max_attempts=2)
    store.create_bucket_if_missing()
    return store


@pytest.fixture
def local_store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.server)])
def store(request):
    return request.getfixturevalue(f"{request.param}_store")
