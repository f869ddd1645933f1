"""The sweep registry (configs/sweeps.yaml) and what the registry sensor should request for each sweep.

Reading the file, validating entries and planning the next runs of a sweep from the artifact store are plain
functions, tested directly; sensors.py turns the plan into RunRequests.

Registry file: a YAML list. Each item is one of
  - a sweep entry in `sweep_from_dict` form (protocol, base_model, source_persona, seed, name, cells), plus the
    registry-only key `schedule`:
        full (default)  on-policy data + base ARC, then every cell of the sweep, then compile + heatmap
        data            on-policy data + base ARC only: the sweep becomes a partition and users launch cells
                        from the UI (one partition, or a backfill)
  - `include: <path>`   another registry file (relative to this one), e.g. a follow-up from configs/followups/.
A follow-up file may also be a mapping {sweeps: [...], compare: {...}}; the registry reads its `sweeps`.

Scheduling is artifact-driven, so it is idempotent: each step is requested only while its artifact is missing from
the store or does not verify (cell_done, ObjectStore.artifact_problem), however often it was built before
(sensors.py picks a run key Dagster has not seen). A sweep that is already complete gets no run; a step whose last
run failed is not retried by the sensor (retry from the UI), and one whose run is still in flight is not requested
again.
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .. import settings
from ..core.protocol import ProtocolError, Sweep
from ..core.sweep_file import read_mapping, sweep_from_dict, yaml_error_line, yaml_loader
from ..steps import cell_done, layout
from ..steps.sweeps import DONE_ARTIFACTS
from .partitions import cell_key

REGISTRY_ENV = "ZLT_SWEEP_REGISTRY"
SCHEDULES = ("full", "data")
REGISTRY_KEYS = ("schedule",)
# the jobs the sensor requests (defs/jobs.py builds them under these names from the asset lists)
DATA_JOB, CELL_JOB, REPORT_JOB = "sweep_data_job", "cell_job", "report_job"


class RegistryError(ValueError):
    """The registry file as a whole cannot be read (missing, not YAML, not a list)."""


@dataclass(frozen=True)
class RegistryEntry:
    sweep: Sweep
    schedule: str
    where: str  # "configs/sweeps.yaml entry 2" -- for messages


@dataclass(frozen=True)
class RegistryProblem:
    where: str
    error: str

    def __str__(self) -> str:
        return f"{self.where}: {self.error}"


def registry_path() -> Path:
    return Path(settings.get(REGISTRY_ENV))


def _load_items(path: Path) -> list:
    if not path.is_file():
        raise RegistryError(f"sweep registry {path} does not exist (set {REGISTRY_ENV} or create it)")
    import yaml

    try:  # the project's loader: 5e-6 reads as a float, as in every other sweep file
        data = yaml.load(path.read_text(), Loader=yaml_loader())
    except yaml.YAMLError as e:  # a syntax error or a duplicate key: the whole file is unreadable
        raise RegistryError(f"sweep registry {path} is not valid YAML: {yaml_error_line(e)}") from e
    if data is None:
        return []
    if isinstance(data, dict) and "sweeps" in data:
        data = data["sweeps"] or []
    if not isinstance(data, list):
        raise RegistryError(f"sweep registry {path} must be a YAML list of sweep entries (or a mapping with "
                            f"'sweeps:'), got {type(data).__name__}")
    return data


def _entry_name(item: Any) -> str:
    if isinstance(item, dict):
        bits = [f"{k}={item[k]}" for k in ("name", "source_persona", "seed") if k in item]
        return f" ({', '.join(bits)})" if bits else ""
    return ""


def read_registry(path: str | Path | None = None, _seen: tuple[Path, ...] = ()
                  ) -> tuple[list[RegistryEntry], list[RegistryProblem]]:
    """All valid entries (deduplicated by sweep id, file order) and one problem per bad entry. A bad entry never
    stops the others; a registry file that cannot be read at all raises RegistryError."""
    path = Path(path) if path is not None else registry_path()
    resolved = path.resolve()
    if resolved in _seen:
        raise RegistryError(f"sweep registry {path} includes itself (include chain: "
                            f"{' -> '.join(str(p) for p in _seen + (resolved,))})")
    entries: list[RegistryEntry] = []
    problems: list[RegistryProblem] = []
    for i, item in enumerate(_load_items(path), 1):
        where = f"{path} entry {i}{_entry_name(item)}"
        try:
            if not isinstance(item, dict):
                raise ProtocolError(f"expected a mapping (a sweep entry or include:), got {item!r}",
                                    field="(top level)")
            if "include" in item:
                if set(item) != {"include"}:
                    raise ProtocolError(f"an include entry holds only 'include', got keys {sorted(item)}",
                                        field="include")
                sub_entries, sub_problems = read_registry(path.parent / str(item["include"]), _seen + (resolved,))
                entries += sub_entries
                problems += sub_problems
                continue
            item = dict(item)
            schedule = item.pop("schedule", "full")
            if schedule not in SCHEDULES:
                raise ProtocolError(f"schedule={schedule!r}; expected one of {SCHEDULES}", field="schedule")
            entries.append(RegistryEntry(sweep_from_config(item), schedule, where))
        except (ProtocolError, RegistryError) as e:
            problems.append(RegistryProblem(where, f"{type(e).__name__}: {e}"))
    return _dedupe(entries, problems)


# --- the one sweep-config check: what the registry sensor and `zlt run` both accept --------------------------------
def sweep_from_config(item: Mapping[str, Any]) -> Sweep:
    """A sweep entry (sweep_from_dict: every field, types, cells, the model path) that Dagster can also hold: its
    id is a valid partition key (its cell keys, `lr=<lr>_ep=<epochs>`, always are). The only place a sweep file is validated.

    Raises ProtocolError naming the field (``<field>: <what>``)."""
    sweep = sweep_from_dict(item)
    check_partition_key(sweep)
    return sweep


def load_sweep_config(path: str | Path) -> Sweep:
    """sweep_from_config of a YAML/JSON file (``zlt run``); ProtocolError naming the field, ``(file)`` when the file
    is missing or unparsable."""
    return sweep_from_config(read_mapping(path))


def check_partition_key(sweep: Sweep) -> None:
    """The sweep id becomes a key of the `sweeps` dynamic partitions and a dimension of the cell multi-partition key:
    Dagster's rules apply (dagster 1.13: '...' is reserved for partition ranges in the UI, control characters do not
    display; '|', ',', '[' and ']' delimit multi-partition keys). Raises ProtocolError naming `name` (or
    `base_model`, from which an unnamed sweep's id is derived)."""
    # dagster/_core/definitions/partitions/utils/{base,multi}.py (pinned dagster==1.13.27)
    from dagster._core.definitions.partitions.utils.base import INVALID_PARTITION_SUBSTRINGS
    from dagster._core.definitions.partitions.utils.multi import INVALID_STATIC_PARTITIONS_KEY_CHARACTERS

    sid = sweep.sweep_id
    bad = [sub for sub in INVALID_PARTITION_SUBSTRINGS if sub in sid]
    bad += sorted(c for c in INVALID_STATIC_PARTITIONS_KEY_CHARACTERS if c in sid)
    if bad:
        field = "name" if sweep.name else "base_model"
        fix = "choose another name" if sweep.name else "set `name` to a sweep id without them"
        raise ProtocolError(f"sweep id {sid!r} contains {bad}, which Dagster reserves in partition keys ('...' marks "
                            f"a partition range; '|', ',', '[', ']' delimit multi-partition keys); {fix}", field=field)


def _dedupe(entries: list[RegistryEntry], problems: list[RegistryProblem]):
    by_id: dict[str, RegistryEntry] = {}
    for e in entries:
        first = by_id.get(e.sweep.sweep_id)
        if first is None:
            by_id[e.sweep.sweep_id] = e
        elif first.sweep != e.sweep:
            problems.append(RegistryProblem(e.where, f"sweep id {e.sweep.sweep_id!r} is already used by "
                                                     f"{first.where} with a different config; rename one"))
        elif first.schedule != e.schedule:
            problems.append(RegistryProblem(e.where, f"same sweep as {first.where} with schedule={e.schedule!r} "
                                                     f"instead of {first.schedule!r}; keep one entry"))
    return list(by_id.values()), problems


# --- planning -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRun:
    job: str
    sweep_id: str
    cell: str | None  # the cell key (partitions.cell_key, lr=5e-06_ep=20) for cell_job, None for per-sweep jobs

    @property
    def run_key(self) -> str:
        return f"{self.sweep_id}:{self.cell or self.job}"


def plan_runs(store, entry: RegistryEntry) -> list[PlannedRun]:
    """The runs this sweep still needs, judged only by committed, verified artifacts in `store` (a torn or partial
    artifact counts as missing): data job while on-policy data or base ARC is missing; once on-policy data exists
    (schedule=full) one cell_job per cell that is not done (cell_done); once every cell is done,
    report_job while the report is outdated. Raises StoreError when the store itself fails."""
    sweep, sid = entry.sweep, entry.sweep.sweep_id
    runs: list[PlannedRun] = []
    has_data = store.artifact_problem(layout.onpolicy_prefix(sid)) is None
    if not has_data or store.artifact_problem(layout.base_arc_prefix(sid)) is not None:
        runs.append(PlannedRun(DATA_JOB, sid, None))
    if entry.schedule != "full" or not has_data:
        return runs
    missing = [c for c in sweep.cells() if not cell_done(store, sweep, c)]
    runs += [PlannedRun(CELL_JOB, sid, cell_key(c)) for c in missing]
    if not missing and report_outdated(store, sweep):
        runs.append(PlannedRun(REPORT_JOB, sid, None))
    return runs


def report_outdated(store, sweep: Sweep) -> bool:
    """True while the heatmap or the compiled results are missing or do not verify, the compiled results still
    list missing cells (a report made by hand before the grid was finished), or a cell's results were committed
    after the compiled results (a cell rebuilt since)."""
    sid = sweep.sweep_id
    prefix = layout.compiled_prefix(sid)
    if store.artifact_problem(layout.heatmap_prefix(sid)) or store.artifact_problem(prefix):
        return True
    if json.loads(store.read_artifact_file(prefix, "compiled_results.json")).get("missing_cells"):
        return True
    def created(p: str) -> datetime.datetime:
        return datetime.datetime.fromisoformat(store.read_manifest(p)["created_at"])

    compiled_at = created(prefix)
    return any(created(layout.cell_prefix(sid, c, a)) > compiled_at for c in sweep.cells()
               for a in DONE_ARTIFACTS)
