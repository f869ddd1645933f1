"""Drive one sweep through the asset graph in-process: what `zlt demo` / `zlt run` do.

Each step is an in-process run of the asset job (what `dagster.materialize` builds) for one partition or a range,
recorded in the instance `dagster dev` uses from the same directory ($DAGSTER_HOME/dagster.yaml if set, else
./dagster.yaml; defs/instance.py), so the UI shows every run and its metadata. Its console logger is `zlt_console`:
the steps' own messages (training epochs with their ETA, commits) as plain lines on stdout, a failed or retried
step as one line on stderr; the full event log stays in the instance.
One process keeps one copy of the base model for all cells. Finished cells are skipped (resume)."""
from __future__ import annotations

import contextlib
import logging
import re
import signal
import sys
import time
from pathlib import Path

from dagster import (
    AssetKey, AssetMaterialization, DagsterExecutionInterruptedError, Definitions, Field, define_asset_job, logger,
)

from .. import settings, steps
from ..core.checkpoint import signal_handlers
from ..steps import layout
from ..steps.common import RunInterrupted
from .assets import (
    ALL_ASSETS, INTERRUPT_TAG, REPORT_ASSETS, SWEEP_DATA_ASSETS, TRAIN_GROUP_SIZE, StepInterrupted, adapter,
    adapter_metadata, arc_scores, base_arc_scores, completions, marker_rates,
)
from .instance import open_instance
from .partitions import add_partitions, partition_key, split_partition_key, sweep_cell_partitions
from .registry import report_outdated
from .resources import ArtifactStore, Compute

RUN_JOB = "__ephemeral_asset_job__"  # the name dagster.materialize gives the job (and the runs it records)


class _StepLines(logging.Handler):
    """zlt's console: a step's own message as `    <step>: <message>` on stdout, beside the runner's lines; a
    failed step as one line on stderr (the exception itself reaches the CLI: a crash prints its traceback once,
    an interrupt its one line), a retry as one line. Dagster's engine events (DEBUG) and run-level events are
    left to the instance's event log."""

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        step, event = meta.get("step_key") or "", meta.get("dagster_event")
        if event is None:
            if step and record.levelno >= logging.INFO:
                print(f"    {step}: {meta.get('orig_message', record.getMessage())}", flush=True)
            return
        kind = event.event_type_value
        if kind not in ("STEP_FAILURE", "STEP_UP_FOR_RETRY"):
            return
        error = getattr(event.event_specific_data, "error", None)
        while error is not None and error.cause is not None and error.cls_name.startswith("Dagster"):
            error = error.cause  # Dagster's wrapper of the step's own exception
        if error is not None and error.cls_name in ("StepInterrupted", "DagsterExecutionInterruptedError",
                                                    "KeyboardInterrupt"):
            return  # an interrupt: the CLI prints the one line
        # the message's first line, which starts with the (module-qualified) class name; a Failure (the steps'
        # bad-input wrapper, defs/assets.py) says the underlying error's class itself
        first = (error.message.strip().splitlines() or [""])[0] if error else "no error recorded"
        what = re.sub(r"^(?:[\w.]+\.)?(\w+): ", lambda m: "" if m.group(1) == "Failure" else f"{m.group(1)}: ", first)
        if kind == "STEP_UP_FOR_RETRY":
            wait = getattr(event.event_specific_data, "seconds_to_wait", None)
            print(f"    {step}: failed, retrying{f' in {wait:g} s' if wait else ''}: {what}", file=sys.stderr,
                  flush=True)
        else:
            print(f"    {step}: failed: {what}", file=sys.stderr, flush=True)


@logger(config_schema={"log_level": Field(str, is_required=False, default_value="INFO")},
        description="zlt's console: step messages as plain lines, a failed or retried step as one line")
def zlt_console(init_context) -> logging.Logger:
    lg = logging.Logger("zlt", level=init_context.logger_config["log_level"])
    lg.addHandler(_StepLines())
    return lg


def _resources(artifacts, device: str, backend: str, arc_source: str, threads: int) -> dict:
    """``artifacts``: a local directory, or an ArtifactStore resource (the CLI's store from the environment)."""
    store = (artifacts if isinstance(artifacts, ArtifactStore)
             else ArtifactStore(kind="local", local_root=str(Path(artifacts).resolve())))
    return {"store": store,
            "compute": Compute(device=device, generation_backend=backend, arc_source=arc_source,
                               torch_threads=threads, train_compile=settings.get("ZLT_TRAIN_COMPILE"))}


class _Signal(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name


@contextlib.contextmanager
def _signals_raise():
    """While the runner's own code runs (between Dagster runs), SIGINT and SIGTERM raise: SIGTERM's default would
    end the process without a word. Dagster swaps in its own handlers for the duration of each run and puts these
    back afterwards (mapping SIGTERM to SIGINT's handler, which is this one too)."""
    def _raise(signum, _frame):
        raise _Signal(signum)

    with signal_handlers((signal.SIGINT, signal.SIGTERM), _raise):
        yield


def eta_seconds(elapsed: float, n_done: int, n_left: int) -> float:
    """Time left for the remaining cells' evaluation (completions, marker rates, ARC): the same work per cell,
    whatever its LR and epochs (training runs before, in one pass, with its own ETA in its progress lines)."""
    if n_done <= 0:
        return 0.0
    return elapsed / n_done * n_left


def contiguous_groups(keys: list, ordered: list, size: int) -> list[list]:
    """`keys` cut into runs of at most `size` that are contiguous in `ordered` (the partitions definition's own
    key order): what a Dagster partition-range run can carry (a range is start..end in that order)."""
    position = {k: i for i, k in enumerate(ordered)}
    groups: list[list] = []
    for key in sorted(keys, key=position.__getitem__):
        last = groups[-1] if groups else None
        if last and len(last) < size and position[key] == position[last[-1]] + 1:
            last.append(key)
        else:
            groups.append([key])
    return groups


class Runner:
    """Materializes one sweep partition by partition, printing progress (cells done, tokens/s, ETA)."""

    def __init__(self, artifacts: str, device: str = "auto", backend: str = "auto", arc_source: str = "",
                 threads: int = 0, force: bool = False):
        # the file `dagster dev` reads from here too (defs/instance.py says which): same runs, same limits
        self.instance, self.instance_file = open_instance()
        print(f"Dagster instance: {self.instance_file}", flush=True)
        self.resources = _resources(artifacts, device, backend, arc_source, threads)
        self.store = self.resources["store"].get_store()
        self.force = force
        self.stage = "start"  # what the run is doing, for the one line an interrupt prints
        self.built_something = False  # whether this run materialized anything (the report then is rebuilt)

    def _materialize(self, assets: list, partition_key=None, partition_range: tuple | None = None) -> dict:
        """One in-process run of `assets` for one partition or a partition range (start, end); returns
        {asset: metadata} of its materializations (the last one per asset)."""
        tags = {INTERRUPT_TAG: "stop"}  # Ctrl-C / SIGTERM stop this process's runs, never retried (defs/assets.py)
        if partition_range is not None:  # Dagster's own range tags: what a backfill run of several partitions gets
            tags.update({"dagster/asset_partition_range_start": str(partition_range[0]),
                         "dagster/asset_partition_range_end": str(partition_range[1])})
        # INFO: the steps' own progress lines (training epochs, ETA); Dagster's engine events are DEBUG. The full
        # event log is in the instance (UI). Built as dagster.materialize builds it, with zlt's console logger.
        console = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
        defs = Definitions(assets=ALL_ASSETS, resources=self.resources, loggers={"console": zlt_console},
                           jobs=[define_asset_job(name=RUN_JOB, selection=assets)])
        self.built_something = True
        try:
            res = defs.resolve_job_def(RUN_JOB).execute_in_process(
                run_config=console, instance=self.instance, partition_key=partition_key, raise_on_error=True,
                tags=tags)
        except StepInterrupted as e:
            detail = e.step if e.what == "interrupted" else f"{e.step}: {e.what}"
            raise RunInterrupted(e.signal_name, f"{self.stage} ({detail})") from e
        except DagsterExecutionInterruptedError as e:  # between two steps of a run: Dagster raises at the next one
            raise RunInterrupted("", self.stage) from e
        return {e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
                for e in res.get_asset_materialization_events()}

    def _record_adapters_of_interrupted_passes(self, sweep, keys: list, cell_by_key: dict) -> None:
        """A pass killed mid-way has committed the adapters of the cells that finished (fewer epochs first), but
        Dagster records a run's materializations only when it ends: report each such adapter to the instance as
        Dagster's own runless materialization, with its committed run record as metadata, so the UI does not
        show a trained cell as missing (and a "materialize missing" does not train it again)."""
        recorded = self.instance.get_materialized_partitions(AssetKey("adapter"))
        for key in keys:
            if str(key) in recorded:
                continue
            cell = cell_by_key[key]
            summary = steps.run_adapters(self.store, sweep, [cell], self.resources["compute"].settings(),
                                         log=lambda _m: None, retrain=False)[cell]
            meta = {**adapter_metadata(sweep, cell, summary), "recorded_by": "zlt run, after an interrupted pass"}
            self.instance.report_runless_asset_event(AssetMaterialization(
                asset_key="adapter", partition=str(key), metadata=meta))
            print(f"  {cell.key}: adapter committed by an interrupted pass, recorded in the instance", flush=True)

    def run(self, sweep) -> dict:
        """Materialize what `sweep` still needs; RunInterrupted on SIGINT/SIGTERM (committed work stays)."""
        with _signals_raise():
            try:
                return self._run(sweep)
            except _Signal as e:
                raise RunInterrupted(e.signal_name, self.stage) from e

    def _run(self, sweep) -> dict:
        sweep = steps.as_stored(self.store, sweep)  # a sweep stored under a legacy id keeps it (and its results)
        steps.register_sweep(self.store, sweep)
        add_partitions(self.instance, sweep)
        sid = sweep.sweep_id
        print(f"sweep {sid}: {len(sweep.cells())} cells, protocol {sweep.protocol.name}, source "
              f"{sweep.source_persona}, seed {sweep.seed}, model {sweep.base_model}", flush=True)
        t_start = time.time()
        if self.force or self.store.artifact_problem(layout.onpolicy_prefix(sid)):  # verified, not just present
            print("[1/3] on-policy data + base-model ARC ...", flush=True)
            self.stage = "on-policy data + base-model ARC"
            self._materialize(SWEEP_DATA_ASSETS, sid)
        else:
            print("[1/3] on-policy data already there: skipped", flush=True)
            if self.store.artifact_problem(layout.base_arc_prefix(sid)):
                self.stage = "base-model ARC"
                self._materialize([base_arc_scores], sid)
        cell_by_key = {partition_key(sweep, c): c for c in sweep.cells()}  # encoded once, never decoded back
        keys = list(cell_by_key)
        evaluated = set()
        for cell in [] if self.force else sweep.cells():  # steps.cell_problem: THE verified "cell done" check
            problem = steps.cell_problem(self.store, sweep, cell)
            if problem is None:
                evaluated.add(cell.key)
            elif not steps.is_missing(problem):  # torn or corrupt: rebuilt, never counted
                print(f"  {cell.key}: rebuilding, {problem}", flush=True)
        todo = [k for k in keys if self.force or cell_by_key[k].key not in evaluated]
        trained = {c.key for c in steps.cells_done(self.store, sweep, "adapter")}
        to_train = [k for k in todo if self.force or cell_by_key[k].key not in trained]
        print(f"[2/3] cells: {len(keys) - len(todo)} already done, {len(todo)} to run "
              f"({len(to_train)} to train)", flush=True)
        self.stage = "recording adapters of an interrupted pass"
        self._record_adapters_of_interrupted_passes(sweep, [k for k in todo if k not in to_train], cell_by_key)
        t_train = time.time()
        ordered = [k for k in sweep_cell_partitions.get_partition_keys(dynamic_partitions_store=self.instance)
                   if split_partition_key(k)[0] == sid]
        for group in contiguous_groups(to_train, ordered, TRAIN_GROUP_SIZE):
            print(f"  training {len(group)} cell(s) in one pass: "
                  f"{', '.join(cell_by_key[k].key for k in group)}", flush=True)
            self.stage = f"training pass of {len(group)} cell(s)"
            self._materialize([adapter], partition_range=(group[0], group[-1]))
        if to_train:
            print(f"  training done in {(time.time() - t_train) / 60:.1f} min", flush=True)
        t_cells = time.time()
        for n, key in enumerate(todo, 1):
            self.stage = f"evaluation of {cell_by_key[key].key}"
            meta = self._materialize([completions, marker_rates, arc_scores], key)
            m = meta[marker_rates.key.to_user_string()]
            elapsed = time.time() - t_cells
            eta = eta_seconds(elapsed, n, len(todo) - n)
            print(f"  cell {len(keys) - len(todo) + n}/{len(keys)} {cell_by_key[key].key}: {m['regime'].value:13s} "
                  f"source {m['source_adoption'].value:.2f} assistant {m['assistant_leakage'].value:.2f} "
                  f"bystander {m['max_bystander_leakage'].value:.2f} | evaluation elapsed {elapsed / 60:.1f} min, "
                  f"ETA {eta / 60:.1f} min", flush=True)
        # the registry sensor's freshness rule (a cell committed after the report, a report listing missing cells,
        # or one that does not verify), and anything this run built: base ARC is in the report too
        if self.force or self.built_something or report_outdated(self.store, sweep):
            print("[3/3] compiled results + heatmap ...", flush=True)
            self.stage = "compiled results + heatmap"
            self._materialize(REPORT_ASSETS, sid)
        else:
            print("[3/3] compiled results + heatmap already up to date: skipped", flush=True)
        out = {"sweep_id": sid, "wall_s": round(time.time() - t_start, 1),
               "compiled": self.store.uri(f"{layout.compiled_prefix(sid)}/compiled_results.json"),
               "heatmap_png": self.store.uri(f"{layout.heatmap_prefix(sid)}/heatmap.png"),
               "heatmap_pdf": self.store.uri(f"{layout.heatmap_prefix(sid)}/heatmap.pdf")}
        print(f"done in {out['wall_s'] / 60:.1f} min\n  compiled results: {out['compiled']}\n"
              f"  heatmap:          {out['heatmap_png']}\n                    {out['heatmap_pdf']}\n"
              f"  open the UI with `dagster dev` (from the repo root) to browse runs and metadata", flush=True)
        return out


