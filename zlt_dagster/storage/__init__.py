"""Object storage for sweep artifacts: a local directory or S3-compatible storage, one API.

``store_from_url`` endpoint precedence (highest first), for s3:// URLs:
  1. the ``endpoint_url`` argument,
  2. env ``ZLT_S3_ENDPOINT_URL``,
  3. env ``AWS_ENDPOINT_URL``,
  4. none: boto3's own configuration (AWS_ENDPOINT_URL_S3, config files) or AWS itself.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..settings import s3_endpoint
from .base import (
    MANIFEST_NAME,
    ChecksumError,
    NotFoundError,
    ObjectStore,
    StoreError,
    UnsafeKeyError,
    validate_key,
)
from .local import LocalStore
from .s3 import S3Store

__all__ = [
    "MANIFEST_NAME",
    "ChecksumError",
    "LocalStore",
    "NotFoundError",
    "ObjectStore",
    "S3Store",
    "StoreError",
    "UnsafeKeyError",
    "display_path",
    "store_from_url",
    "validate_key",
]


def store_from_url(url: str, *, endpoint_url: str | None = None) -> ObjectStore:
    """``file:///abs/path`` or a plain path -> LocalStore; ``s3://bucket[/prefix]`` -> S3Store."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"store URL must be a non-empty string, got {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"store URL {url!r}: expected s3://bucket[/prefix], the bucket is missing")
        if parts.query or parts.fragment:
            raise ValueError(f"store URL {url!r}: s3:// URLs take no query or fragment")
        if endpoint_url is None:
            endpoint_url = s3_endpoint()
        return S3Store(parts.netloc, prefix=parts.path.strip("/"), endpoint_url=endpoint_url)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"store URL {url!r}: file:// URLs must be local (file:///abs/path), got host {parts.netloc!r}")
        return LocalStore(Path(unquote(parts.path)))
    if scheme and len(scheme) > 1:  # one letter would be a Windows drive ("C:\\...")
        raise ValueError(f"store URL {url!r}: unsupported scheme {scheme!r}; expected file://, s3:// or a plain path")
    return LocalStore(Path(url))


def display_path(uri: str) -> str:
    """What a person copies into a shell: ``file:///a/b%20c`` -> ``/a/b c`` (a browser will not open file:// links
    from the Dagster UI); an ``s3://`` URI is already that and is returned as it is."""
    parts = urlsplit(uri)
    return unquote(parts.path) if parts.scheme.lower() == "file" else uri
