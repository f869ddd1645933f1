"""Fixtures of the reliability tests: a fresh S3 namespace on the session's loopback S3 server (`aws_env` and
`s3_server_url` come from tests/conftest.py)."""
from __future__ import annotations

import uuid

import pytest

from reliability_helpers import BUCKET


@pytest.fixture
def s3_store(s3_server_url, aws_env):
    from zlt_dagster.storage import S3Store

    store = S3Store(BUCKET, prefix=f"t-{uuid.uuid4().hex[:10]}", endpoint_url=s3_server_url, connect_timeout=2,
                    read_timeout=10, max_attempts=2)
    store.create_bucket_if_missing()
    return store
