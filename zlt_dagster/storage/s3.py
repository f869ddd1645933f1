"""S3Store: AWS S3 or any S3-compatible server (MinIO, Ceph, moto, ...) through boto3.

Credentials come ONLY from boto3's default chain (env vars, shared config/credentials files, IAM role,
IRSA, ...); they are never constructor arguments and never appear in repr(), str() or error messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import boto3
import boto3.exceptions
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from .base import (LOCKS_ENV, ConditionalWritesUnsupportedError, NotFoundError, ObjectStore, PathLike,
                   StoreAccessError, StoreError, normalize_prefix, store_locks_wanted, validate_key)

_MB = 1024 * 1024
_MIN_PART = 5 * _MB  # S3's minimum multipart part size
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
# wrong or missing rights: a configuration error, not a transient fault
_ACCESS_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                 "ExpiredToken", "AllAccessDisabled", "AccountProblem"}
# a response body cut off mid-stream (botocore does not retry reading the body of a GetObject)
_BODY_ERRORS = (botocore.exceptions.ResponseStreamingError, botocore.exceptions.IncompleteReadError,
                botocore.exceptions.ReadTimeoutError)
# a conditional write that did not happen: 412 (version differs / key exists); 409 (a concurrent conditional write
# to the same key is in flight, AWS asks to retry)
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


# Outcome of the conditional-write probe per (endpoint, bucket), once per process: None = honoured, else the
# refusal message. A probe that failed for a transient reason is not recorded (the next call probes again).
_PROBED: dict[tuple[str, str], str | None] = {}
_PROBE_LOCK = threading.Lock()
PROBE_DIR = ".zlt-conditional-write-probe"


def _client_error(err: StoreError) -> tuple[str, str] | None:
    """(S3 error code, HTTP status) of the botocore ClientError behind a StoreError, or None if it had another cause."""
    cause = err.__cause__
    if not isinstance(cause, botocore.exceptions.ClientError):
        return None
    return (str(cause.response.get("Error", {}).get("Code", "")),
            str(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")))


def _precondition_failed(err: StoreError) -> bool:
    got = _client_error(err)
    return got is not None and (got[0] in _PRECONDITION_CODES or got[1] in ("412", "409"))


def _not_implemented(err: StoreError) -> bool:
    got = _client_error(err)
    return got is not None and (got[0] == "NotImplemented" or got[1] == "501")


def redact_url(url: str | None) -> str | None:
    """Drop any user:password@ from an endpoint URL before it is shown anywhere."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class S3Store(ObjectStore):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region_name: str | None = None,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        max_attempts: int = 5,
        multipart_threshold_mb: float = 8,
    ):
        if not bucket or "/" in bucket:
            raise ValueError(f"S3Store: bucket must be a bare bucket name without '/', got {bucket!r}")
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        self.endpoint_url = endpoint_url
        self.region_name = region_name
        self._config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Custom endpoints (MinIO & co.) generally need path-style bucket addressing.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        threshold = int(multipart_threshold_mb * _MB)
        self._transfer = TransferConfig(multipart_threshold=threshold, multipart_chunksize=max(threshold, _MIN_PART))
        self._client = None
        self._lock = threading.Lock()
        self._max_attempts = max_attempts

    # The boto3 client is created lazily and dropped on pickling (it is not picklable; processes rebuild it).
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                session = boto3.session.Session()
                self._client = session.client(
                    "s3", endpoint_url=self.endpoint_url, region_name=self.region_name, config=self._config
                )
            return self._client

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={redact_url(self.endpoint_url)!r})"

    def _where(self) -> str:
        return f"endpoint {redact_url(self.endpoint_url) or 'AWS default'}"

    def location(self) -> str:
        return self._where()

    def _full(self, key: str, *, allow_empty: bool = False) -> str:
        key = validate_key(key, allow_empty=allow_empty)
        if not self.prefix:
            return key
        return f"{self.prefix}/{key}" if key else self.prefix

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    @contextlib.contextmanager
    def _errors(self, action: str, full_key: str) -> Iterator[None]:
        """Map boto errors to StoreError/NotFoundError naming bucket, key and endpoint."""
        where = f"{action} s3://{self.bucket}/{full_key} ({self._where()})"
        try:
            yield
        except botocore.exceptions.ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _NOT_FOUND_CODES or (status == "404" and code != "NoSuchBucket"):
                raise NotFoundError(f"{where}: key not found ({code or status})") from e
            if code in _ACCESS_CODES or status == "403":
                raise StoreAccessError(f"{where} refused: {code or status}: {err.get('Message', e)} (check the "
                                       "credentials and the bucket policy)") from e
            raise StoreError(f"{where} failed: {code or status}: {err.get('Message', e)}") from e
        except botocore.exceptions.NoCredentialsError as e:
            raise StoreAccessError(
                f"{where} failed: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE or an IAM role)"
            ) from e
        except (botocore.exceptions.BotoCoreError, boto3.exceptions.Boto3Error) as e:
            raise StoreError(f"{where} failed: {type(e).__name__}: {e}") from e

    # ---- primitives -------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._full(key)
        with self._errors("put_bytes", full):
            self.client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data))

    def _read_object(self, full: str, what: str, read):
        """GetObject, then ``read(body, response)``. botocore retries the request but not a body cut off
        mid-stream (IncompleteRead, a read timeout while streaming): retry those here, with the same number of
        attempts."""
        attempts = max(1, self._max_attempts)
        for attempt in range(attempts):
            try:
                with self._errors(what, full):
                    resp = self.client.get_object(Bucket=self.bucket, Key=full)
                    with contextlib.closing(resp["Body"]) as body:
                        return read(body, resp)
            except StoreError as e:
                if attempt + 1 == attempts or not isinstance(e.__cause__, _BODY_ERRORS):
                    raise
                time.sleep(min(2.0, 0.1 * 2**attempt))
        raise AssertionError("unreachable")

    def _get_object(self, full: str) -> tuple[bytes, str]:
        """(body, ETag) of one object."""
        return self._read_object(full, "get_bytes", lambda body, resp: (body.read(), resp["ETag"]))

    def get_bytes(self, key: str) -> bytes:
        return self._get_object(self._full(key))[0]

    def _hash_key(self, key: str) -> tuple[str, int]:
        """(sha256, size), streamed in 1 MiB chunks (an adapter need not fit in memory)."""
        def digest(body, _resp) -> tuple[str, int]:
            h, size = hashlib.sha256(), 0
            for chunk in body.iter_chunks(_MB):
                h.update(chunk)
                size += len(chunk)
            return h.hexdigest(), size
        return self._read_object(self._full(key), "hash", digest)

    def exists(self, key: str) -> bool:
        full = self._full(key)
        try:
            with self._errors("exists", full):
                self.client.head_object(Bucket=self.bucket, Key=full)
        except NotFoundError:
            return False
        return True

    def list_keys(self, prefix: str = "") -> list[str]:
        full = self._full(normalize_prefix(prefix), allow_empty=True)
        s3_prefix = f"{full}/" if full else ""
        keys = []
        with self._errors("list_keys", s3_prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=s3_prefix):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):  # skip console-made "folder" marker objects
                        keys.append(self._rel(obj["Key"]))
        return sorted(keys)

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._errors("delete", full):
            self.client.delete_object(Bucket=self.bucket, Key=full)

    def delete_prefix(self, prefix: str) -> None:
        prefix = normalize_prefix(prefix, allow_empty=False)
        full_keys = [self._full(k) for k in self.list_keys(prefix)]
        for start in range(0, len(full_keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = full_keys[start : start + 1000]
            with self._errors("delete_prefix", self._full(prefix) + "/"):
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StoreError(
                    f"delete_prefix s3://{self.bucket}/{self._full(prefix)}/ ({self._where()}): "
                    f"{len(resp['Errors'])} keys not deleted, e.g. {first.get('Key')!r}: "
                    f"{first.get('Code')}: {first.get('Message')}"
                )

    def put_file(self, key: str, path: PathLike) -> None:
        full = self._full(key)
        src = Path(path)
        if not src.is_file():
            raise NotFoundError(f"put_file: local file {str(src)!r} to upload as s3://{self.bucket}/{full} does not exist")
        with self._errors("put_file", full):
            self.client.upload_file(str(src), self.bucket, full, Config=self._transfer)

    def get_file(self, key: str, path: PathLike) -> Path:
        full = self._full(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._errors("get_file", full):  # s3transfer writes to a temp name and renames when complete
            self.client.download_file(self.bucket, full, str(dest), Config=self._transfer)
        return dest

    # ---- conditional writes (leases): S3 If-None-Match / If-Match on PutObject and DeleteObject --------------
    supports_conditional_writes = True

    def locks_enabled(self) -> bool:
        if not store_locks_wanted():
            return False
        self.check_conditional_writes()
        return True

    def check_writer_guard(self) -> None:
        if store_locks_wanted():
            self.check_conditional_writes()

    def check_conditional_writes(self) -> None:
        """Probe, once per endpoint and bucket in this process, that the server honours conditional writes: a probe
        key is created with ``If-None-Match: *``, created again the same way (must be refused with 412), then
        overwritten with ``If-Match`` naming a wrong ETag (must be refused), then deleted. Some S3-compatible
        servers accept these headers and ignore them; leases built on them would not exclude anyone.

        Raises ConditionalWritesUnsupportedError naming the endpoint and bucket if the server ignored a condition
        (or answered 501 NotImplemented); StoreError if the probe itself could not run (network, permissions).
        """
        cache_key = (redact_url(self.endpoint_url) or "AWS default", self.bucket)
        with _PROBE_LOCK:
            if cache_key in _PROBED:
                problem = _PROBED[cache_key]
            else:
                problem = self._probe()
                _PROBED[cache_key] = problem
        if problem:
            raise ConditionalWritesUnsupportedError(problem)

    def _probe(self) -> str | None:
        key = f"{PROBE_DIR}/{secrets.token_hex(8)}"
        where = f"S3 server at {self._where()} (bucket {self.bucket!r})"
        advice = (f"commit and training leases would not exclude concurrent writers, so two runs of one cell could "
                  f"tear its artifact. Use a server that honours conditional writes (e.g. AWS S3, MinIO) "
                  f"or set {LOCKS_ENV}=0 to make Dagster's run queue (one run per partition) the only writer "
                  f"guard: README, 'S3 servers without conditional writes'")
        try:
            try:
                token = self.put_bytes_if_absent(key, b"probe-1")
            except StoreError as e:
                if _not_implemented(e):
                    return f"{where} does not implement conditional writes (PutObject If-None-Match: * answered " \
                           f"{e}); {advice}"
                raise
            if token is None:
                raise StoreError(f"conditional-write probe: {self.where(key)} already existed before it was created "
                                 f"(another probe with the same random name?); retry")
            if self.put_bytes_if_absent(key, b"probe-2") is not None:
                return (f"{where} ignores conditional writes: a second PutObject of probe key "
                        f"{self.uri(key)} with If-None-Match: * was accepted (expected 412 PreconditionFailed); "
                        f"{advice}")
            if self.put_bytes_if_match(key, b"probe-3", '"00000000000000000000000000000000"') is not None:
                return (f"{where} ignores conditional writes: a PutObject of probe key {self.uri(key)} with "
                        f"If-Match: <a wrong ETag> was accepted (expected 412 PreconditionFailed); {advice}")
            return None
        finally:
            self.delete(key)

    def put_bytes_if_absent(self, key: str, data: bytes) -> str | None:
        full = self._full(key)
        try:
            with self._errors("put_bytes_if_absent", full):
                return self.client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data), IfNoneMatch="*")["ETag"]
        except StoreError as e:
            if _precondition_failed(e):
                return None
            raise

    def put_bytes_if_match(self, key: str, data: bytes, token: str) -> str | None:
        full = self._full(key)
        try:
            with self._errors("put_bytes_if_match", full):
                return self.client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data), IfMatch=token)["ETag"]
        except NotFoundError:
            return None
        except StoreError as e:
            if _precondition_failed(e):
                return None
            raise

    def get_bytes_with_token(self, key: str) -> tuple[bytes, str]:
        return self._get_object(self._full(key))

    def delete_if_match(self, key: str, token: str) -> bool:
        full = self._full(key)
        try:
            with self._errors("delete_if_match", full):
                self.client.delete_object(Bucket=self.bucket, Key=full, IfMatch=token)
        except NotFoundError:
            return True
        except StoreError as e:
            if _precondition_failed(e):
                return False
            raise
        return True

    def uri(self, key: str = "") -> str:
        full = self._full(key, allow_empty=True)
        return f"s3://{self.bucket}/{full}" if full else f"s3://{self.bucket}"

    # ---- dev/test helper --------------------------------------------------------------------
    def _bucket_exists(self) -> bool:
        try:
            with self._errors("create_bucket_if_missing (head_bucket)", ""):
                self.client.head_bucket(Bucket=self.bucket)
        except NotFoundError:
            return False
        return True

    def create_bucket_if_missing(self) -> None:
        if self._bucket_exists():
            return
        kwargs = {"Bucket": self.bucket}
        region = self.client.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        with self._errors("create_bucket_if_missing (create_bucket)", ""):
            self.client.create_bucket(**kwargs)
