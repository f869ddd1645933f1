"""Exclusive, expiring, self-renewing leases on one object-store key (the concurrent-writer guard).

Used by ObjectStore.commit_* (a lease on `<prefix>/.lock` while an artifact is written) and by training (one
trainer per cell). Built on the stores' conditional writes: create-if-absent, replace-if-version.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING

from .errors import LeaseHeldError, LeaseLostError, NotFoundError, StoreError, dumps_json

if TYPE_CHECKING:
    from .base import ObjectStore

log = logging.getLogger(__name__)


class NoLease:
    """Stands in for a Lease when store locks are off (ZLT_STORE_LOCKS=0)."""

    def __enter__(self) -> "NoLease":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def check(self) -> None:
        return None


class Lease:
    """An exclusive, expiring lease on one key, held by this process while the ``with`` block runs.

    The lease object is JSON {owner, purpose, acquired_at, expires_at, ttl_s, seq}. Acquire: create it if absent;
    if it exists and is ours (our create landed but its response was lost), adopt it; if it expired (its owner
    died: SIGKILL, evicted pod), take it over with a write conditional on the stale version; else poll until
    ``wait_s`` and raise LeaseHeldError. A daemon thread renews it every ttl/3 (conditional on our last version);
    if a renewal finds someone else's version, or the lease ran out, ``check()`` raises LeaseLostError. Release
    deletes it only if it is still our version. Expiry uses wall clocks: hosts must be NTP-synced to well within
    the TTL.
    """

    def __init__(self, store: "ObjectStore", key: str, ttl_s: float, wait_s: float, poll_s: float, purpose: str):
        if ttl_s <= 0:
            raise ValueError(f"lease TTL must be > 0, got {ttl_s}")
        self.store, self.key, self.ttl_s, self.wait_s, self.poll_s = store, key, float(ttl_s), wait_s, poll_s
        self.purpose = purpose
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"
        self.token: str | None = None
        self.expires_at = 0.0
        self.taken_over_from: dict | None = None
        self.waited_s = 0.0
        self.renewals = 0
        self._seq = 0
        self._acquired_at = 0.0
        self._lost: str | None = None
        self._last_renew_error: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- record --------------------------------------------------------------------------------------------
    def _record(self) -> tuple[bytes, float]:
        now = time.time()
        self._seq += 1
        rec = {"owner": self.owner, "purpose": self.purpose, "acquired_at": self._acquired_at or now,
               "renewed_at": now, "expires_at": now + self.ttl_s, "ttl_s": self.ttl_s, "seq": self._seq}
        return dumps_json(rec, where=f"lease {self.key}"), now + self.ttl_s

    @staticmethod
    def _parse(data: bytes) -> dict | None:
        try:
            rec = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return rec if isinstance(rec, dict) and isinstance(rec.get("expires_at"), (int, float)) else None

    def _landed(self, data: bytes) -> str | None:
        """After a refused conditional write: is the stored version ours anyway (a retried request whose first
        attempt succeeded)? Return its token if so."""
        try:
            current, token = self.store.get_bytes_with_token(self.key)
        except NotFoundError:
            return None
        return token if current == data else None

    # ---- acquire / renew / release ---------------------------------------------------------------------------
    def acquire(self) -> "Lease":
        start = time.monotonic()
        deadline = start + self.wait_s
        while True:
            data, expires = self._record()
            token = self.store.put_bytes_if_absent(self.key, data) or self._landed(data)
            if token:
                break
            try:
                current, cur_token = self.store.get_bytes_with_token(self.key)
            except NotFoundError:
                continue  # released in between: try to create again
            rec = self._parse(current)
            if rec is not None and rec.get("owner") == self.owner:
                data, token = current, cur_token
                expires = rec["expires_at"]
                break
            if rec is None or rec["expires_at"] < time.time():
                data, expires = self._record()
                token = self.store.put_bytes_if_match(self.key, data, cur_token) or self._landed(data)
                if token:
                    self.taken_over_from = rec or {"owner": "?", "unparsable": True}
                    break
                continue
            if time.monotonic() >= deadline:
                raise LeaseHeldError(
                    f"{self.store.where(self.key)} is held by {rec.get('owner')!r} ({rec.get('purpose') or 'no purpose'}) "
                    f"until {_dt.datetime.fromtimestamp(rec['expires_at'], _dt.timezone.utc).isoformat()} "
                    f"(renewed while its owner lives); waited {time.monotonic() - start:.0f} s. Another run is "
                    f"writing the same thing: retry later")
            time.sleep(max(0.01, min(self.poll_s, deadline - time.monotonic())))
        self.waited_s = time.monotonic() - start
        self._acquired_at = self._acquired_at or time.time()
        with self._mutex:
            self.token, self.expires_at = token, expires
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease:{self.key}", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                data, expires = self._record()
                with self._mutex:
                    token = self.token
                new = self.store.put_bytes_if_match(self.key, data, token) or self._landed(data)
                with self._mutex:
                    if new:
                        self.token, self.expires_at = new, expires
                        self.renewals += 1
                    else:
                        self._lost = "another writer took it over (or it was deleted)"
                        return
            except StoreError as e:  # transient: keep trying until the lease would have expired
                with self._mutex:
                    self._last_renew_error = str(e)
                if time.time() > self.expires_at:
                    with self._mutex:
                        self._lost = f"could not renew it before it expired: {e}"
                    return

    def check(self) -> None:
        with self._mutex:
            lost = self._lost
            if lost is None and time.time() > self.expires_at:
                # The renewal thread has not given up yet (a renewal request may still be retrying): say what the
                # last failed renewal saw, so the error names the request and endpoint that failed.
                lost = f"it expired at {self.expires_at:.0f} without renewal" + (
                    f" (last renewal error: {self._last_renew_error})" if self._last_renew_error else "")
        if lost:
            raise LeaseLostError(f"lease {self.store.where(self.key)} ({self.purpose}) lost: {lost}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            token, lost = self.token, self._lost
        if token and not lost:
            try:
                self.store.delete_if_match(self.key, token)
            except StoreError as e:  # not fatal: the lease expires by itself after ttl_s
                log.warning("could not release lease %s (%s); it expires within %.0f s", self.store.uri(self.key), e,
                            self.ttl_s)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


