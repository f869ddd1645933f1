"""The store's errors and its one JSON encoder: the leaves that base.py (the ObjectStore API) and lease.py (the
concurrent-writer guard) both build on, so neither imports the other in a circle."""
from __future__ import annotations

import json
from typing import Any


class StoreError(Exception):
    """Any failure of the object store (I/O, network, permissions, bad data)."""


class NotFoundError(StoreError):
    """A key, an artifact manifest or a file listed in a manifest does not exist."""


class ChecksumError(StoreError):
    """A stored file does not match the sha256/size recorded in its artifact manifest."""


class ManifestError(StoreError):
    """An artifact manifest exists but cannot be used: not JSON, malformed, or of another format version."""


class ConditionalWritesUnsupportedError(StoreError):
    """The server accepts conditional writes (If-None-Match / If-Match) but does not honour them."""


class StoreAccessError(StoreError):
    """The store refused our credentials or permissions (HTTP 403): retrying will not help."""


class UnsafeKeyError(StoreError):
    """A key or relative path is absolute, has empty/'.'/'..' segments or a backslash."""


class LeaseHeldError(StoreError):
    """Another live writer holds the lease (transient: retry later)."""


class LeaseLostError(StoreError):
    """Our lease expired or was taken over while we worked; our result must not be committed."""


def dumps_json(obj: Any, *, where: str) -> bytes:
    try:
        return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise TypeError(f"cannot serialise {where} as JSON: {e}") from e
