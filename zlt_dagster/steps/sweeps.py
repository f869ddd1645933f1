"""Sweeps in the store (register, load) and THE "is this cell done" decision, used by `zlt run` (resume), the
registry sensor and `zlt status` alike."""
from __future__ import annotations

import dataclasses
import re

from ..core.protocol import Cell, Sweep, sweep_from_stored
from ..storage import ObjectStore
from ..storage.base import ARTIFACT_MISSING
from . import layout
from .common import StepError, SweepIdTaken


def _same_config(stored: dict, sweep: Sweep) -> bool:
    """Whether a stored sweep.json is ``sweep``'s config (the name aside: it only chooses the id)."""
    return {**stored, "name": ""} == {**sweep.to_dict(), "name": ""}


def _slug_with_extension(sweep: Sweep) -> str:
    """The model part of ids made before `.gguf` was dropped from it."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", sweep.base_model.rstrip("/").split("/")[-1]).strip("-").lower()


def legacy_sweep_id(sweep: Sweep) -> str:
    """The id an unnamed sweep had before ids were led by persona and seed (until issue 15):
    <model>__<persona>__s<seed>__<protocol>__tail<n>__<hash8>."""
    p = sweep.protocol
    return (f"{_slug_with_extension(sweep)}__{sweep.source_persona}__s{sweep.seed}__{p.name}__tail"
            f"{p.marker_tail_tokens}__{sweep.config_hash()[:8]}")


def previous_sweep_ids(sweep: Sweep) -> list[str]:
    """Ids an unnamed sweep had under earlier schemes, newest first: before `.gguf` left the model part and
    `-custom` marked a protocol with overrides (villain_s42_paper_qwen.gguf_1a2b3c), and the legacy scheme above.
    Only those that differ from its id now."""
    p = sweep.protocol
    tail = f"-tail{p.marker_tail_tokens}" if p.marker_tail_tokens else ""
    before = (f"{sweep.source_persona}_s{sweep.seed}_{p.name}{tail}_{_slug_with_extension(sweep)}_"
              f"{sweep.config_hash()[:6]}")
    return [sid for sid in dict.fromkeys((before, legacy_sweep_id(sweep))) if sid != sweep.sweep_id]


def as_stored(store: ObjectStore, sweep: Sweep) -> Sweep:
    """``sweep`` under the id the store already holds it by: an unnamed sweep registered under an id of an earlier
    scheme (same config; previous_sweep_ids) keeps that id, so its results are found, not recomputed; otherwise
    ``sweep`` itself."""
    if sweep.name or store.exists(layout.sweep_config_key(sweep.sweep_id)):
        return sweep
    for sid in previous_sweep_ids(sweep):
        key = layout.sweep_config_key(sid)
        if store.exists(key) and _same_config(store.read_json(key), sweep):
            return dataclasses.replace(sweep, name=sid)
    return sweep


def register_sweep(store: ObjectStore, sweep: Sweep) -> bool:
    """Write sweeps/<id>/sweep.json once. Returns True if new. A different config under the same id is an error."""
    sweep.validate()
    key = layout.sweep_config_key(sweep.sweep_id)
    if store.exists(key):
        stored = store.read_json(key)
        if not _same_config(stored, sweep):
            raise SweepIdTaken(f"sweep id {sweep.sweep_id!r} already exists in {store.where(key)} with a different "
                            f"config; give the new sweep another name")
        return False
    store.write_json(key, sweep.to_dict())
    return True


def load_sweep(store: ObjectStore, sweep_id: str) -> Sweep:
    """The sweep stored under ``sweep_id``. A sweep stored under an id of an older id scheme keeps that id (it
    names its storage prefix and its partitions), so it is returned with ``name=sweep_id``."""
    key = layout.sweep_config_key(sweep_id)
    if not store.exists(key):
        raise StepError(f"sweep {sweep_id!r} is not registered: {store.where(key)} does not exist")
    sweep = sweep_from_stored(store.read_json(key))
    return sweep if sweep.sweep_id == sweep_id else dataclasses.replace(sweep, name=sweep_id)


# A cell is done when its results are committed and whole; the adapter and completions behind them were verified
# (sha256) when the results were computed from them.
DONE_ARTIFACTS = ("marker_rates", "arc_scores")


def cell_problem(store: ObjectStore, sweep: Sweep, cell: Cell,
                 artifacts: tuple[str, ...] = DONE_ARTIFACTS) -> str | None:
    """None if each of the cell's ``artifacts`` is committed and whole (manifest present, every listed file present
    with its size and sha256: ObjectStore.verify_artifact), else why the cell is not done ("<artifact> missing",
    or "<artifact>: <what is wrong>" for a torn or corrupt one). Raises StoreError when the store itself fails
    (never taken for a missing cell)."""
    for artifact in artifacts:
        problem = store.artifact_problem(layout.cell_prefix(sweep.sweep_id, cell, artifact))
        if problem:
            return f"{artifact} {problem}" if problem == ARTIFACT_MISSING else f"{artifact}: {problem}"
    return None


def is_missing(problem: str) -> bool:
    """A cell_problem that says "never built (or deleted)", as opposed to torn or corrupt."""
    return problem.endswith(f" {ARTIFACT_MISSING}")


def cell_done(store: ObjectStore, sweep: Sweep, cell: Cell, artifacts: tuple[str, ...] = DONE_ARTIFACTS) -> bool:
    """THE "cell done" decision (cell_problem is None): a torn or partial artifact is rebuilt, never counted."""
    return cell_problem(store, sweep, cell, artifacts) is None


def cells_done(store: ObjectStore, sweep: Sweep, artifacts: tuple[str, ...] | str = DONE_ARTIFACTS) -> list[Cell]:
    """The sweep's cells whose ``artifacts`` (one name or several) are all whole (cell_done)."""
    arts = (artifacts,) if isinstance(artifacts, str) else tuple(artifacts)
    return [c for c in sweep.cells() if cell_done(store, sweep, c, arts)]
