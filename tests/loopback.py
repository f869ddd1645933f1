"""Loopback test servers and credentials shared by every test tier (storage contract, reliability, production
step, e2e). A plain module with a unique name, importable from any test directory (pytest puts tests/ on sys.path
for tests/conftest.py); `conftest` itself is never imported by name: with several conftest.py files that name is
ambiguous."""
from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

# Dummy credentials with distinctive values, so tests can assert they never leak into reprs, errors or event logs.
ACCESS_KEY = "AKIAZLTTESTKEYID0001"
SECRET_KEY = "zlt-test-secret-DO-NOT-LEAK-0123456789abcdef"

# AWS variables that would point boto3 somewhere else than the test's own server and credentials.
FOREIGN_AWS_VARS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                    "ZLT_S3_ENDPOINT_URL")


def free_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_aws_env(tmp_dir) -> dict[str, str]:
    """Dummy credentials and region ONLY from the environment, cut off from any real AWS config files and from
    instance metadata. Remove FOREIGN_AWS_VARS as well."""
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": f"{tmp_dir}/no-aws-config", "AWS_SHARED_CREDENTIALS_FILE": f"{tmp_dir}/no-aws-credentials",
            "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """A real S3-compatible HTTP server (moto) on 127.0.0.1 for the duration of the block; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield "http://{}:{}".format(*server.get_host_and_port())
    finally:
        server.stop()
