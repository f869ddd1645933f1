"""A cell's training checkpoints in the object store: each local checkpoint (core/checkpoint.py) is committed as
an artifact sweeps/<id>/cells/<cell>/checkpoint/step-NNNNNNNN/; a rerun resumes from the newest one that
verifies; all are deleted once the cell's adapter is committed (steps/adapter.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..core.checkpoint import CheckpointError, parse_step_dir, read_state, step_dir_name
from ..storage import ObjectStore, StoreError
from .common import Log


class StoreCheckpoints:
    """Committed checkpoints of one cell in an ObjectStore: push after each local save, pull the newest valid one."""

    def __init__(self, store: ObjectStore, prefix: str, log: Log | None = None):
        self.store, self.prefix = store, prefix
        self.log = log or (lambda _m: None)
        self.pushed: list[int] = []

    def committed_steps(self) -> list[int]:
        steps = set()
        for key in self.store.list_keys(self.prefix):
            parts = key[len(self.prefix) + 1:].split("/")
            if len(parts) == 2 and parts[1] == "MANIFEST.json" and parse_step_dir(parts[0]) is not None:
                steps.add(parse_step_dir(parts[0]))
        return sorted(steps)

    def push(self, path: Path, step: int, reason: str) -> None:
        prefix = f"{self.prefix}/{step_dir_name(step)}"
        self.store.commit_artifact(prefix, path, meta={"step": step, "reason": reason, "kind": "checkpoint"})
        self.pushed.append(step)
        self.log(f"checkpoint of step {step} ({reason}) committed to {self.store.uri(prefix)}")
        for old in self.committed_steps():  # only after the new one is committed
            if old < step:
                self.store.delete_prefix(f"{self.prefix}/{step_dir_name(old)}")

    def pull_latest(self, local_dir: Path) -> Path | None:
        """Fetch (sha256-verified) the newest committed checkpoint; skip unreadable ones; None if there is none."""
        for step in reversed(self.committed_steps()):
            dest = Path(local_dir) / step_dir_name(step)
            try:
                self.store.fetch_artifact(f"{self.prefix}/{step_dir_name(step)}", dest)
                read_state(dest)
                return dest
            except (StoreError, CheckpointError) as e:
                self.log(f"checkpoint of step {step} is unusable, skipping it: {e}")
                shutil.rmtree(dest, ignore_errors=True)
        return None

    def clear(self) -> None:
        self.store.delete_prefix(self.prefix)
