"""Backend-specific behaviour: S3 multipart/credentials/timeouts, local atomic writes, store_from_url."""

from __future__ import annotations

import os
import pickle
import time

import pytest

from zlt_dagster.storage import LocalStore, NotFoundError, S3Store, StoreError, store_from_url


def _all_text(exc: BaseException) -> str:
    """str/repr of an exception and of everything it chains to."""
    parts = []
    while exc is not None:
        parts += [str(exc), repr(exc)]
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


# ---- S3 ---------------------------------------------------------------------------------------
@pytest.mark.server
def test_s3_large_file_goes_multipart(s3_store, tmp_path):
    big = tmp_path / "adapter_model.safetensors"
    big.write_bytes(os.urandom(9 * 1024 * 1024))
    s3_store.commit_artifact("cells/lr=5e-06_ep=20/adapter", {"adapter_model.safetensors": big})
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key=s3_store._full("cells/lr=5e-06_ep=20/adapter/adapter_model.safetensors"))
    assert "-" in head["ETag"], f"expected a multipart ETag ('<md5>-<parts>'), got {head['ETag']}"
    out = s3_store.fetch_artifact("cells/lr=5e-06_ep=20/adapter", tmp_path / "dl")
    assert (out / "adapter_model.safetensors").read_bytes() == big.read_bytes()


@pytest.mark.server
def test_s3_keys_live_under_the_store_prefix(s3_store):
    s3_store.put_bytes("x/y.txt", b"1")
    raw = s3_store.client.list_objects_v2(Bucket=s3_store.bucket, Prefix=s3_store.prefix + "/")
    assert [o["Key"] for o in raw["Contents"]] == [f"{s3_store.prefix}/x/y.txt"]
    assert s3_store.uri("x/y.txt") == f"s3://{s3_store.bucket}/{s3_store.prefix}/x/y.txt"


@pytest.mark.server
def test_s3_credentials_never_leak(s3_store, s3_server_url, leak_markers):
    texts = [repr(s3_store), str(s3_store)]
    with pytest.raises(NotFoundError) as missing:
        s3_store.get_bytes("missing/key")
    texts.append(_all_text(missing.value))
    no_bucket = S3Store("no-such-bucket-zlt", endpoint_url=s3_server_url, max_attempts=1)
    with pytest.raises(StoreError) as nb:
        no_bucket.get_bytes("k")
    texts.append(_all_text(nb.value))
    assert "no-such-bucket-zlt" in str(nb.value) and "k" in str(nb.value)
    for text in texts:
        for secret in leak_markers:
            assert secret not in text
    assert "missing/key" in str(missing.value) and s3_store.bucket in str(missing.value)


def test_s3_repr_hides_endpoint_userinfo():
    store = S3Store("b", prefix="p", endpoint_url="http://user:hunter2@minio.local:9000")
    assert "hunter2" not in repr(store) and "minio.local:9000" in repr(store)
    assert repr(store) == "S3Store(bucket='b', prefix='p', endpoint_url='http://minio.local:9000')"


def test_s3_unreachable_endpoint_fails_fast(aws_env, closed_port, leak_markers):
    endpoint = f"http://127.0.0.1:{closed_port}"
    store = S3Store("bucket", endpoint_url=endpoint, connect_timeout=0.5, read_timeout=0.5, max_attempts=1)
    start = time.monotonic()
    with pytest.raises(StoreError) as err:
        store.get_bytes("some/key")
    assert time.monotonic() - start < 5
    assert endpoint in str(err.value) and "s3://bucket/some/key" in str(err.value)
    assert not [s for s in leak_markers if s in _all_text(err.value)]
    with pytest.raises(StoreError, match="127.0.0.1"):
        store.exists("some/key")  # an unreachable store is an error, never "does not exist"


def test_s3_store_pickles_without_its_client(aws_env):
    store = S3Store("b", prefix="p", endpoint_url="http://127.0.0.1:1")
    _ = store.client
    clone = pickle.loads(pickle.dumps(store))
    assert repr(clone) == repr(store) and clone._client is None


def test_s3_constructor_validation():
    with pytest.raises(ValueError, match="bucket"):
        S3Store("a/b")
    with pytest.raises(Exception, match="unsafe prefix"):
        S3Store("b", prefix="../x")


# ---- local ------------------------------------------------------------------------------------
def test_local_writes_leave_no_temp_files_and_have_normal_permissions(local_store, tmp_path):
    local_store.put_bytes("a/b.txt", b"x")
    src = tmp_path / "f"
    src.write_bytes(b"y")
    local_store.put_file("a/c.txt", src)
    names = sorted(p.name for p in local_store.root.rglob("*"))
    assert names == ["a", "b.txt", "c.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert (local_store.root / "a" / "b.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_local_uri_is_file_url(local_store):
    assert local_store.uri("a/b c.txt") == (local_store.root / "a" / "b c.txt").as_uri()
    assert local_store.uri("lr=5e-06_ep=20").endswith("/lr=5e-06_ep=20")
    assert local_store.uri().startswith("file:///")


# ---- store_from_url ---------------------------------------------------------------------------
def test_store_from_url_local(tmp_path, monkeypatch):
    s = store_from_url((tmp_path / "a b").as_uri())
    assert isinstance(s, LocalStore) and s.root == tmp_path / "a b"
    assert store_from_url(str(tmp_path)).root == tmp_path
    monkeypatch.chdir(tmp_path)
    assert store_from_url("rel/dir").root == tmp_path / "rel" / "dir"


def test_store_from_url_s3_endpoint_precedence(monkeypatch):
    monkeypatch.delenv("ZLT_S3_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    s = store_from_url("s3://bucket/some/prefix/")
    assert isinstance(s, S3Store) and (s.bucket, s.prefix, s.endpoint_url) == ("bucket", "some/prefix", None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-env:9000")
    assert store_from_url("s3://bucket").endpoint_url == "http://aws-env:9000"
    monkeypatch.setenv("ZLT_S3_ENDPOINT_URL", "http://zlt-env:9000")
    assert store_from_url("s3://bucket").endpoint_url == "http://zlt-env:9000"
    assert store_from_url("s3://bucket", endpoint_url="http://arg:1").endpoint_url == "http://arg:1"
    assert store_from_url("s3://bucket").prefix == ""


@pytest.mark.parametrize("url", ["", "gs://bucket/x", "s3://", "file://remotehost/x", "s3://b/../x"])
def test_store_from_url_rejects_bad_urls(url):
    with pytest.raises((ValueError, StoreError)):
        store_from_url(url)
