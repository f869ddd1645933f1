"""Object-store abstraction: a few primitives per backend, one artifact protocol for all.

Keys are '/'-separated relative paths ("sweeps/s1/cells/lr=5e-06_ep=20/adapter/adapter_config.json").
Prefixes use *directory* semantics: the prefix "a/b" covers "a/b/..." but never "a/bc".

An *artifact* is every object under a prefix plus ``<prefix>/MANIFEST.json``, which is written LAST and
lists each file's sha256 and size. An artifact exists only once its manifest exists, so a writer that
crashes half-way leaves no artifact behind, only orphan files that the next commit removes.

Concurrent writers: a commit holds a *lease* on ``<prefix>/.lock`` (owner + expiry, renewed by a heartbeat
thread), created with a conditional write (LocalStore: hard link = create-if-absent, S3: ``If-None-Match: *``) and
renewed/released only if it is still ours (``If-Match: <etag>``). Two commits of one prefix therefore run one after
the other instead of interleaving (which could pair one writer's manifest with the other's files); a lease whose
owner died expires after its TTL and is taken over. An S3 server that accepts conditional writes but ignores
them is found by a probe (S3Store.check_conditional_writes) and refused; ``ZLT_STORE_LOCKS=0`` turns leases off
for such a server, leaving Dagster's run queue (one run per partition) as the only writer guard.
"""

from __future__ import annotations

import abc
import datetime as _dt
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .errors import (  # noqa: F401  (re-exported: the store's API names its errors)
    ChecksumError, ConditionalWritesUnsupportedError, LeaseHeldError, LeaseLostError, ManifestError, NotFoundError,
    StoreAccessError, StoreError, UnsafeKeyError, dumps_json,
)
from ..settings import store_locks_wanted
from .lease import Lease, NoLease


MANIFEST_NAME = "MANIFEST.json"
LOCK_NAME = ".lock"  # a lease object; never part of an artifact
MANIFEST_FORMAT_VERSION = 1
ARTIFACT_MISSING = "missing"  # ObjectStore.artifact_problem: no manifest (never committed, or deleted)
_HASH_CHUNK = 1024 * 1024

PathLike = Union[str, "os.PathLike[str]"]


LOCKS_ENV = "ZLT_STORE_LOCKS"  # off (0): Dagster's run queue (one run per partition) is the only writer guard;
# see README, 'S3 servers without conditional writes'


def validate_key(key: str, *, allow_empty: bool = False, what: str = "key") -> str:
    """Return ``key`` unchanged if it is a safe relative '/'-separated path, else raise UnsafeKeyError."""
    if not isinstance(key, str):
        raise UnsafeKeyError(f"{what} must be a str, got {type(key).__name__}: {key!r}")
    if key == "":
        if allow_empty:
            return key
        raise UnsafeKeyError(f"{what} must not be empty")
    problems = []
    if "\\" in key:
        problems.append("contains a backslash")
    if "\x00" in key:
        problems.append("contains a NUL byte")
    if key.startswith("/"):
        problems.append("is absolute (starts with '/')")
    segments = key.split("/")
    if any(seg == "" for seg in segments):
        problems.append("has an empty segment ('//' or a leading/trailing '/')")
    if any(seg in (".", "..") for seg in segments):
        problems.append("has a '.' or '..' segment")
    if problems:
        raise UnsafeKeyError(
            f"unsafe {what} {key!r}: {', '.join(problems)}; expected a relative '/'-separated path "
            "like 'sweeps/s1/cells/lr=5e-06_ep=20/adapter'"
        )
    return key


def normalize_prefix(prefix: str, *, allow_empty: bool = True) -> str:
    """Validate a prefix; one trailing '/' is tolerated and stripped ("a/b/" -> "a/b")."""
    if isinstance(prefix, str) and prefix.endswith("/") and prefix != "/":
        prefix = prefix[:-1]
    return validate_key(prefix, allow_empty=allow_empty, what="prefix")


def join_key(prefix: str, relpath: str) -> str:
    return f"{prefix}/{relpath}" if prefix else relpath


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: PathLike) -> tuple[str, int]:
    """Return (sha256 hex, size in bytes) of a local file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def temp_sibling(path: Path) -> Path:
    """A unique temp name in the same directory as ``path`` (so os.replace is atomic)."""
    return path.with_name(f".zlt-tmp-{path.name}.{secrets.token_hex(6)}")


@dataclass(frozen=True)
class _Source:
    """One file of an artifact to commit: in-memory bytes or a local file path."""

    data: bytes | None = None
    path: Path | None = None


class ObjectStore(abc.ABC):
    """Backend primitives (abstract) + the artifact protocol (implemented here, once)."""

    # ---- primitives -------------------------------------------------------------------------
    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Raise NotFoundError if ``key`` does not exist."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix/`` (recursive, sorted, full keys relative to the store root)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one key; deleting a missing key is not an error."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under ``prefix/`` (not keys that merely start with the same characters)."""

    @abc.abstractmethod
    def put_file(self, key: str, path: PathLike) -> None: ...

    @abc.abstractmethod
    def get_file(self, key: str, path: PathLike) -> Path:
        """Download ``key`` to local ``path`` (parents created); raise NotFoundError if missing."""

    @abc.abstractmethod
    def uri(self, key: str = "") -> str:
        """file://... or s3://... for a key or prefix ('' = the store root)."""

    def location(self) -> str:
        """Where the store lives beyond its URIs (an S3 endpoint), for error messages; '' when the URI says it all."""
        return ""

    def where(self, key: str = "") -> str:
        """A key's URI plus the store's location, for error messages: 's3://b/k (endpoint http://...)'."""
        loc = self.location()
        return f"{self.uri(key)} ({loc})" if loc else self.uri(key)

    # ---- conditional writes (for leases); a backend that has them sets supports_conditional_writes ------------
    supports_conditional_writes = False
    lock_ttl_s: float = 60.0    # commit leases: expiry if not renewed (renewed every ttl/3 while the commit runs)
    lock_wait_s: float = 300.0  # how long a commit waits for another live writer of the same prefix

    def put_bytes_if_absent(self, key: str, data: bytes) -> str | None:
        """Create ``key`` only if it does not exist; return its version token, or None if it existed."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

    def put_bytes_if_match(self, key: str, data: bytes, token: str) -> str | None:
        """Overwrite ``key`` only if its current version token is ``token``; new token, or None if not."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

    def get_bytes_with_token(self, key: str) -> tuple[bytes, str]:
        """(bytes, version token); NotFoundError if missing."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

    def delete_if_match(self, key: str, token: str) -> bool:
        """Delete ``key`` only if its version token is ``token``; True if deleted or already gone."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

    def locks_enabled(self) -> bool:
        """Whether commits and training take leases: the backend has conditional writes and ZLT_STORE_LOCKS is not
        0. Raises ConditionalWritesUnsupportedError where the backend's server turns out to ignore them."""
        return self.supports_conditional_writes and store_locks_wanted()

    def check_writer_guard(self) -> None:
        """Raise ConditionalWritesUnsupportedError if this store cannot exclude concurrent writers of one artifact
        and the user has not opted out of leases (ZLT_STORE_LOCKS=0). Call before writing anything."""
        return None

    def lease(self, key: str, *, ttl_s: float | None = None, wait_s: float | None = None, poll_s: float = 0.5,
              purpose: str = "") -> "Lease":
        """A context manager holding an exclusive, self-renewing lease on ``key`` (see Lease)."""
        return Lease(self, validate_key(key), ttl_s or self.lock_ttl_s,
                     self.lock_wait_s if wait_s is None else wait_s, poll_s, purpose)

    # ---- small JSON objects -----------------------------------------------------------------
    def write_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, dumps_json(obj, where=f"object for {self.where(key)}"))

    def read_json(self, key: str) -> Any:
        return self._parse_json(self.get_bytes(key), self.where(key))

    @staticmethod
    def _parse_json(data: bytes, where: str) -> Any:
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{where} is not valid UTF-8 JSON: {e}") from e

    # ---- artifacts: commit --------------------------------------------------------------------
    def commit_artifact(
        self,
        prefix: str,
        local_dir_or_files: PathLike | Mapping[str, PathLike] | Iterable[PathLike],
        meta: dict | None = None,
    ) -> dict:
        """Upload files under ``prefix/`` then write the manifest last; return the manifest.

        ``local_dir_or_files``: a directory (all files, recursively, relative paths kept), a mapping
        {relpath: local file}, or an iterable of local files (stored under their base names).
        """
        sources = {rel: _Source(path=p) for rel, p in _collect_local_files(local_dir_or_files).items()}
        return self._commit(prefix, sources, meta)

    def commit_bytes_artifact(self, prefix: str, files: Mapping[str, bytes], meta: dict | None = None) -> dict:
        sources = {}
        for rel, data in files.items():
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"artifact file {rel!r} for prefix {prefix!r}: expected bytes, got {type(data).__name__}")
            sources[rel] = _Source(data=bytes(data))
        return self._commit(prefix, sources, meta)

    def commit_json_artifact(self, prefix: str, name: str, obj: Any, meta: dict | None = None) -> dict:
        data = dumps_json(obj, where=f"artifact file {name!r} for prefix {prefix!r}")
        return self.commit_bytes_artifact(prefix, {name: data}, meta)

    def _commit(self, prefix: str, sources: Mapping[str, _Source], meta: dict | None) -> dict:
        prefix = normalize_prefix(prefix, allow_empty=False)
        if not sources:
            raise ValueError(f"refusing to commit an empty artifact at {self.where(prefix)}: no files given")
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta for {self.where(prefix)} must be a dict or None, got {type(meta).__name__}")
        # Everything that can fail on the caller's side (bad paths, meta not JSON) fails BEFORE we touch
        # the store, so a bad call never destroys the previous version of the artifact.
        files: dict[str, dict] = {}
        for rel in sorted(sources):
            validate_key(rel, what=f"relative path in artifact {prefix!r}")
            if rel == MANIFEST_NAME:
                raise UnsafeKeyError(f"artifact {self.where(prefix)}: a file may not be named {MANIFEST_NAME} (reserved)")
            src = sources[rel]
            if src.data is not None:
                files[rel] = {"sha256": sha256_bytes(src.data), "size": len(src.data)}
            else:
                digest, size = _hash_local(src.path, self.where(join_key(prefix, rel)))
                files[rel] = {"sha256": digest, "size": size}
        manifest = {
            "format_version": MANIFEST_FORMAT_VERSION,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "meta": meta or {},
            "files": files,
        }
        manifest_bytes = dumps_json(manifest, where=f"manifest for {self.where(prefix)}")

        manifest_key = join_key(prefix, MANIFEST_NAME)
        lock_key = join_key(prefix, LOCK_NAME)
        if LOCK_NAME in files:
            raise UnsafeKeyError(f"artifact {self.where(prefix)}: a file may not be named {LOCK_NAME} (reserved)")
        guard = self.lease(lock_key, purpose=f"commit {prefix}") if self.locks_enabled() else NoLease()
        with guard:  # one writer per prefix at a time
            self.delete(manifest_key)  # the old version stops existing before any of its files change
            for rel in sorted(sources):
                src = sources[rel]
                key = join_key(prefix, rel)
                if src.data is not None:
                    self.put_bytes(key, src.data)
                else:
                    self.put_file(key, src.path)
            guard.check()  # a writer whose lease was taken over must not write the manifest
            self.put_bytes(manifest_key, manifest_bytes)

            wanted = {join_key(prefix, rel) for rel in files} | {manifest_key, lock_key}
            for key in self.list_keys(prefix):
                if key not in wanted:
                    self.delete(key)
        return manifest

    # ---- artifacts: read ----------------------------------------------------------------------
    def artifact_exists(self, prefix: str) -> bool:
        return self.exists(join_key(normalize_prefix(prefix, allow_empty=False), MANIFEST_NAME))

    def read_manifest(self, prefix: str) -> dict:
        prefix = normalize_prefix(prefix, allow_empty=False)
        key = join_key(prefix, MANIFEST_NAME)
        try:
            data = self.get_bytes(key)
        except NotFoundError as e:
            raise NotFoundError(
                f"no artifact at {self.where(prefix)}: manifest {key!r} is missing "
                "(never committed, deleted, or a commit did not finish)"
            ) from e
        try:
            manifest = self._parse_json(data, f"manifest {self.where(key)}")
        except StoreError as e:
            raise ManifestError(str(e)) from e
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ManifestError(f"manifest {self.where(key)} is malformed: expected an object with a 'files' mapping")
        version = manifest.get("format_version")
        if version != MANIFEST_FORMAT_VERSION:
            raise ManifestError(
                f"manifest {self.where(key)} has format_version {version!r}; this code reads {MANIFEST_FORMAT_VERSION}"
            )
        for rel in manifest["files"]:
            validate_key(rel, what=f"file name in manifest {self.where(key)}")
        return manifest

    def _hash_key(self, key: str) -> tuple[str, int]:
        """(sha256 hex, size) of a stored object; NotFoundError if missing. Backends may stream instead."""
        data = self.get_bytes(key)
        return sha256_bytes(data), len(data)

    def verify_artifact(self, prefix: str) -> dict:
        """Check that the artifact at ``prefix`` is whole: its manifest is readable and every file it lists exists
        with the recorded size and sha256. Returns the manifest.

        Raises NotFoundError (no manifest, or a listed file is missing), ManifestError (manifest unreadable),
        ChecksumError (a file's size or sha256 differs: a torn or corrupted artifact), or another StoreError when
        the store itself fails (network, permissions): that one says nothing about the artifact.
        """
        prefix = normalize_prefix(prefix, allow_empty=False)
        manifest = self.read_manifest(prefix)
        for rel, expected in sorted(manifest["files"].items()):
            key = join_key(prefix, rel)
            try:
                digest, size = self._hash_key(key)
            except NotFoundError as e:
                raise NotFoundError(f"artifact {self.where(prefix)} is incomplete: its manifest lists {rel!r} "
                                    f"but {self.where(key)} is missing") from e
            _check(expected if isinstance(expected, dict) else {}, digest, size, rel, self.where(key))
        return manifest

    def artifact_problem(self, prefix: str) -> str | None:
        """None if the artifact at ``prefix`` is whole (``verify_artifact`` passes), else why it does not count:
        ARTIFACT_MISSING ("missing": no manifest), or "<ErrorClass>: <message>" for an unreadable manifest, a listed
        file missing, a torn or corrupt file. Store failures (network,
        permissions) are raised as StoreError, never taken for a missing artifact."""
        prefix = normalize_prefix(prefix, allow_empty=False)
        if not self.exists(join_key(prefix, MANIFEST_NAME)):
            return ARTIFACT_MISSING
        try:
            self.verify_artifact(prefix)
        except (NotFoundError, ManifestError, ChecksumError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    def fetch_artifact(self, prefix: str, local_dir: PathLike) -> Path:
        """Download every manifest file into ``local_dir`` and verify sha256 + size; return local_dir."""
        prefix = normalize_prefix(prefix, allow_empty=False)
        manifest = self.read_manifest(prefix)
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        for rel, expected in sorted(manifest["files"].items()):
            key = join_key(prefix, rel)
            dest = local_dir.joinpath(*rel.split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_sibling(dest)
            try:
                try:
                    self.get_file(key, tmp)
                except NotFoundError as e:
                    raise NotFoundError(
                        f"artifact {self.where(prefix)} is incomplete: its manifest lists {rel!r} "
                        f"but {self.where(key)} is missing"
                    ) from e
                digest, size = sha256_file(tmp)
                _check(expected, digest, size, rel, self.where(key))
                os.replace(tmp, dest)
            finally:
                if tmp.exists():
                    tmp.unlink()
        return local_dir

    def read_artifact_file(self, prefix: str, relpath: str) -> bytes:
        """Bytes of one artifact file, verified against the manifest."""
        prefix = normalize_prefix(prefix, allow_empty=False)
        validate_key(relpath, what="relative path")
        manifest = self.read_manifest(prefix)
        key = join_key(prefix, relpath)
        if relpath not in manifest["files"]:
            raise NotFoundError(
                f"artifact {self.where(prefix)} has no file {relpath!r}; it has: {sorted(manifest['files'])}"
            )
        try:
            data = self.get_bytes(key)
        except NotFoundError as e:
            raise NotFoundError(
                f"artifact {self.where(prefix)} is incomplete: its manifest lists {relpath!r} "
                f"but {self.where(key)} is missing"
            ) from e
        _check(manifest["files"][relpath], sha256_bytes(data), len(data), relpath, self.where(key))
        return data


def _check(expected: dict, digest: str, size: int, rel: str, where: str) -> None:
    if size != expected.get("size"):
        raise ChecksumError(
            f"artifact file {rel!r} ({where}) is corrupt: size {size} bytes, manifest expects {expected.get('size')}"
        )
    if digest != expected.get("sha256"):
        raise ChecksumError(
            f"artifact file {rel!r} ({where}) is corrupt: sha256 {digest}, manifest expects {expected.get('sha256')}"
        )


def _hash_local(path: Path, target: str) -> tuple[str, int]:
    try:
        return sha256_file(path)
    except FileNotFoundError as e:
        raise NotFoundError(f"local file {str(path)!r} to upload as {target} does not exist") from e
    except OSError as e:
        raise StoreError(f"cannot read local file {str(path)!r} to upload as {target}: {e}") from e


def _collect_local_files(spec: PathLike | Mapping[str, PathLike] | Iterable[PathLike]) -> dict[str, Path]:
    """Normalise the ``local_dir_or_files`` argument of commit_artifact to {relpath: local Path}."""
    if isinstance(spec, Mapping):
        return {rel: Path(p) for rel, p in spec.items()}
    if isinstance(spec, (str, os.PathLike)):
        root = Path(spec)
        if not root.is_dir():
            raise NotFoundError(f"local artifact directory {str(root)!r} does not exist or is not a directory")
        out = {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath, name)
                out[full.relative_to(root).as_posix()] = full
        return out
    out: dict[str, Path] = {}
    for p in spec:
        p = Path(p)
        if p.name in out:
            raise ValueError(f"two local files share the base name {p.name!r}: {out[p.name]} and {p}; pass a mapping")
        out[p.name] = p
    return out
