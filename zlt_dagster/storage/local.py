"""LocalStore: the object store as a directory tree; every write is temp file + os.replace (atomic)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from urllib.parse import quote
from collections.abc import Iterator
from pathlib import Path

from .base import (
    NotFoundError,
    ObjectStore,
    PathLike,
    StoreError,
    normalize_prefix,
    sha256_bytes,
    sha256_file,
    temp_sibling,
    validate_key,
)

_TMP_MARK = ".zlt-tmp-"


class LocalStore(ObjectStore):
    def __init__(self, root: PathLike):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore(root={str(self.root)!r})"

    def _path(self, key: str, *, allow_empty: bool = False) -> Path:
        key = validate_key(key, allow_empty=allow_empty)
        return self.root.joinpath(*key.split("/")) if key else self.root

    @contextlib.contextmanager
    def _errors(self, action: str, key: str, path: Path | str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as e:
            raise NotFoundError(f"{action}: key {key!r} not found at {str(path)!r} (store root {str(self.root)!r})") from e
        except IsADirectoryError as e:
            raise NotFoundError(f"{action}: key {key!r} is a directory at {str(path)!r}, not an object") from e
        except OSError as e:
            raise StoreError(f"{action}: key {key!r} at {str(path)!r} failed: {e}") from e

    def _atomic_write(self, dest: Path, write) -> None:
        """Create dest's parents, write via ``write(fileobj)`` into a sibling temp file, then os.replace."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(dest)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, like a normal file
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()

    # ---- primitives -------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        with self._errors("put_bytes", key, dest):
            self._atomic_write(dest, lambda fh: fh.write(data))

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with self._errors("get_bytes", key, path):
            return path.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _hash_key(self, key: str) -> tuple[str, int]:
        path = self._path(key)
        with self._errors("hash", key, path):  # streamed: an adapter need not fit in memory twice
            return sha256_file(path)

    def list_keys(self, prefix: str = "") -> list[str]:
        base = self._path(normalize_prefix(prefix), allow_empty=True)
        if not base.is_dir():
            return []
        keys = []
        with self._errors("list_keys", prefix, base):
            for dirpath, _dirnames, filenames in os.walk(base):
                for name in filenames:
                    if not name.startswith(_TMP_MARK):
                        keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors("delete", key, path):
            path.unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        prefix = normalize_prefix(prefix, allow_empty=False)
        base = self._path(prefix)
        if base.is_dir():
            with self._errors("delete_prefix", prefix, base):
                shutil.rmtree(base)

    def put_file(self, key: str, path: PathLike) -> None:
        dest = self._path(key)
        src = Path(path)
        if not src.is_file():
            raise NotFoundError(f"put_file: local file {str(src)!r} to store as key {key!r} does not exist")

        def copy(fh) -> None:
            with open(src, "rb") as sfh:
                shutil.copyfileobj(sfh, fh, 1024 * 1024)

        with self._errors("put_file", key, dest):
            self._atomic_write(dest, copy)

    def get_file(self, key: str, path: PathLike) -> Path:
        src = self._path(key)
        dest = Path(path)

        def copy(fh) -> None:
            with open(src, "rb") as sfh:
                shutil.copyfileobj(sfh, fh, 1024 * 1024)

        with self._errors("get_file", key, src):
            if not src.is_file():
                raise FileNotFoundError(str(src))
            self._atomic_write(dest, copy)
        return dest

    # ---- conditional writes (leases): one flock per directory serialises them; the version token is the sha256 --
    supports_conditional_writes = True

    @contextlib.contextmanager
    def _dir_lock(self, directory: Path) -> Iterator[None]:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def put_bytes_if_absent(self, key: str, data: bytes) -> str | None:
        dest = self._path(key)
        with self._errors("put_bytes_if_absent", key, dest), self._dir_lock(dest.parent):
            tmp = temp_sibling(dest)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                try:
                    os.link(tmp, dest)  # atomic create-if-absent, with the full content already in place
                except FileExistsError:
                    return None
            finally:
                tmp.unlink(missing_ok=True)
        return sha256_bytes(data)

    def put_bytes_if_match(self, key: str, data: bytes, token: str) -> str | None:
        dest = self._path(key)
        with self._errors("put_bytes_if_match", key, dest), self._dir_lock(dest.parent):
            if self._token(dest) != token:  # a missing file matches no token
                return None
            self._atomic_write(dest, lambda fh: fh.write(data))
        return sha256_bytes(data)

    def get_bytes_with_token(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, sha256_bytes(data)

    def delete_if_match(self, key: str, token: str) -> bool:
        dest = self._path(key)
        with self._errors("delete_if_match", key, dest), self._dir_lock(dest.parent):
            current = self._token(dest)
            if current is None:
                return True
            if current != token:
                return False
            dest.unlink()
        return True

    @staticmethod
    def _token(dest: Path) -> str | None:
        """The version token of a file (sha256 of its bytes), None when it does not exist; call under the lock."""
        try:
            return sha256_bytes(dest.read_bytes())
        except FileNotFoundError:
            return None

    def uri(self, key: str = "") -> str:
        # Keep RFC 3986 sub-delimiters such as '=' readable ("lr=5e-06_ep=20"), unlike Path.as_uri().
        return "file://" + quote(self._path(key, allow_empty=True).as_posix(), safe="/:@!$&'()*+,;=~")
