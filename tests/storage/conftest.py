"""Fixtures: one `store` fixture that runs every contract test on LocalStore and on S3Store against a
real S3-compatible HTTP server (moto on loopback; `aws_env` and `s3_server_url` come from tests/conftest.py)."""

from __future__ import annotations

import uuid

import pytest

from zlt_dagster.storage import LocalStore, S3Store

from loopback import ACCESS_KEY, SECRET_KEY, free_port

TEST_BUCKET = "zlt-test-bucket"


@pytest.fixture
def leak_markers() -> tuple[str, str]:
    """The dummy credential values; they must never show up in any repr or error message."""
    return ACCESS_KEY, SECRET_KEY


@pytest.fixture
def closed_port() -> int:
    return free_port()


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
