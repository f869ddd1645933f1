"""Drive one sweep through the asset graph in-process: what `zlt demo` / `zlt run` do.

Each step is an in-process run of the asset job (what `dagster.materialize` builds) for one partition or a range,
recorded in the instance `dagster dev` uses from the same directory ($DAGSTER_HOME/dagster.yaml if set, else
./dagster.yaml; defs/instance.py), so the UI shows every run and its metadata. Its console logger is `zlt_console`:
the steps' own messages (training epochs with their ETA, commits) as plain lines on stdout, a failed or retried
step as one line on stderr; the full event log stays in the instance.
One process keeps one copy of the base model for all cells. Finished cells are skipped (resume)."""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path

from dagster import (
    AssetKey, AssetMaterialization, DagsterExecutionInterruptedError, Definitions, Field, define_asset_job, logger,
)

from .. import settings, steps
from ..core.checkpoint import signal_handlers
from ..steps import layout
from ..steps.common import DECODE_COMPILE_MIN_STEPS, RunInterrupted, WorkerRunFailed
from .assets import (
    ALL_ASSETS, INTERRUPT_TAG, REPORT_ASSETS, SWEEP_DATA_ASSETS, TRAIN_GROUP_SIZE, StepInterrupted, adapter,
    adapter_metadata, arc_scores, base_arc_scores, completions, marker_rates,
)
from .gpu_pinning import pin_gpu, visible_gpus
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


def _resources(artifacts, device: str, backend: str, arc_source: str, threads: int,
               many_decodes: bool = False) -> dict:
    """``artifacts``: a local directory, an ArtifactStore resource (the CLI's store from the environment) or its
    fields as a dict (what a worker process receives). many_decodes: the process runs enough completions steps for
    `ZLT_DECODE_COMPILE=auto` to compile their decode (compiles_decodes)."""
    store = (artifacts if isinstance(artifacts, ArtifactStore) else ArtifactStore(**artifacts)
             if isinstance(artifacts, dict) else ArtifactStore(kind="local", local_root=str(Path(artifacts).resolve())))
    return {"store": store,
            "compute": Compute(device=device, generation_backend=backend, arc_source=arc_source,
                               torch_threads=threads, train_compile=settings.get("ZLT_TRAIN_COMPILE"),
                               decode_compile=settings.get("ZLT_DECODE_COMPILE"), many_decodes=many_decodes)}


def compiles_decodes(cells: int, workers: int) -> bool:
    """Whether the cells' evaluation runs gets the compute resource that lets `ZLT_DECODE_COMPILE=auto` compile the
    completions decode: when each worker process runs at least DECODE_COMPILE_MIN_STEPS completions steps, the
    number that repays the compile it pays once (steps/common.py has the arithmetic)."""
    return cells >= DECODE_COMPILE_MIN_STEPS * max(1, workers)


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


def balanced_parts(costs: list[float], parts: int) -> list[int]:
    """The cut positions that split `costs` (in order) into `parts` contiguous non-empty pieces with the smallest
    largest sum (the linear partition problem; exact by dynamic programming, n <= a few hundred cells)."""
    n, parts = len(costs), min(parts, len(costs))
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[k][i]: the smallest largest sum of the first i costs in k pieces; cut[k][i]: where its last piece starts
    best = [[float("inf")] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                worst = max(best[k - 1][j], prefix[i] - prefix[j])
                if worst < best[k][i]:
                    best[k][i], cut[k][i] = worst, j
    cuts, i = [], n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        cuts.append(i)
    return sorted(cuts)[1:]  # the first piece starts at 0


def split_for_workers(groups: list[list], cost: dict, workers: int) -> list[list]:
    """`groups` (training passes, each contiguous in the partition order) cut further until there are `workers`
    of them where the cells allow, so that `workers` GPUs finish at about the same time: each extra piece goes to
    the pass with the largest cost per piece, and a pass is cut where its pieces' largest cost is smallest. A
    cell's cost is its epochs (a fused pass spends per step in proportion to the cells still training). Every
    piece stays contiguous (a Dagster partition range)."""
    pieces = [1] * len(groups)
    totals = [sum(cost[k] for k in g) for g in groups]
    for _ in range(workers - len(groups)):
        open_ = [i for i, g in enumerate(groups) if pieces[i] < len(g)]
        if not open_:
            break
        i = max(open_, key=lambda i: totals[i] / pieces[i])
        pieces[i] += 1
    out = []
    for g, p in zip(groups, pieces):
        bounds = [0, *balanced_parts([cost[k] for k in g], p), len(g)]
        out += [list(g[a:b]) for a, b in zip(bounds, bounds[1:])]
    return out


def plain_metadata(meta: dict) -> dict:
    """{asset: {name: value}} with Dagster's MetadataValue wrappers removed (what a worker process hands back)."""
    return {asset: {k: getattr(v, "value", v) for k, v in m.items()} for asset, m in meta.items()}


def worker_count(gpus, device: str) -> int:
    """How many worker processes `zlt run` uses: `gpus` as given, or for "auto" one per visible GPU when the
    device may be CUDA (`auto`/`cuda`), else 1 (an explicit `cuda:<n>` or `cpu` is one device)."""
    if gpus != "auto":
        return int(gpus)
    return max(1, len(visible_gpus())) if device in ("auto", "cuda") else 1


# --- several GPUs: one worker process per GPU, each pinned to its own (defs/gpu_pinning.py) --------------------
_WORKER: "Runner | None" = None
_STOPPING = None  # the runner's "stop" event (multiprocessing.Event), set when it stops: start no further run


def _worker_start(runner_args: dict, stopping) -> None:
    """A worker's first act in its fresh (spawned) interpreter: take a GPU before anything can start CUDA, then
    open the instance. While idle it ignores SIGINT: a Ctrl-C reaches the whole process group, and an idle worker
    has nothing to stop (Dagster installs its own handler while a run executes, which stops at the next step
    boundary or training checkpoint). `stopping`: set by the runner on an interrupt or a failure, before it
    forwards the signal; the tasks the pool had already handed to this worker then end without starting."""
    global _WORKER, _STOPPING
    _STOPPING = stopping
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # discards a SIGINT held back since the spawn (_run_all)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if runner_args["device"] in ("auto", "cuda"):
        pin_gpu(settings.get("ZLT_GPU_LOCK_DIR"), log=lambda m: print(f"  worker {os.getpid()}: {m}", flush=True))
    _WORKER = Runner(**runner_args, gpus=1, announce=False)


def _worker_materialize(asset_names: list[str], partition_key=None, partition_range=None,
                        many_decodes: bool = False) -> dict:
    assets = [a for a in ALL_ASSETS if a.key.to_user_string() in asset_names]
    if _STOPPING.is_set():  # queued before the runner stopped (the pool hands out tasks ahead): not started
        raise RunInterrupted("", "the run stopped before this task started")
    try:
        return _WORKER._materialize(assets, partition_key, partition_range, many_decodes)
    except RunInterrupted:
        raise
    except BaseException as e:
        traceback.print_exc()
        what = f"{type(e).__name__}: {e}"
        if type(e).__name__ == "Failure":  # the steps' bad-input wrapper (defs/assets.py) names the error itself
            what = str(getattr(e, "description", None) or e)
        partition = partition_key or "..".join(partition_range or ())
        raise WorkerRunFailed(f"{', '.join(asset_names)} ({partition}) failed in worker {os.getpid()}: "
                              f"{' '.join(what.split())}; its traceback is above") from None


class Runner:
    """Materializes one sweep partition by partition, printing progress (cells done, tokens/s, ETA). With
    `gpus` > 1 the training passes and the cells' evaluations run in that many worker processes at once, one GPU
    each; the sweep-level steps too (on-policy data and base ARC side by side)."""

    def __init__(self, artifacts: str, device: str = "auto", backend: str = "auto", arc_source: str = "",
                 threads: int = 0, force: bool = False, gpus="auto", announce: bool = True):
        # the file `dagster dev` reads from here too (defs/instance.py says which): same runs, same limits
        self.instance, self.instance_file = open_instance()
        if announce:
            print(f"Dagster instance: {self.instance_file}", flush=True)
        self.workers = worker_count(gpus, device)
        # what a worker builds its own Runner from: plain values (a resource object does not pickle), the store as
        # its resource's fields
        store_fields = artifacts.model_dump() if isinstance(artifacts, ArtifactStore) else artifacts
        self._runner_args = dict(artifacts=store_fields, device=device, backend=backend, arc_source=arc_source,
                                 threads=threads, force=force)
        self.pool: cf.ProcessPoolExecutor | None = None
        self._stopping = None  # the workers' stop event, made with the pool
        self.resources = _resources(artifacts, device, backend, arc_source, threads)
        # the evaluation runs' resources when each process runs enough of them to compile its decodes
        self._many_decodes_resources = _resources(artifacts, device, backend, arc_source, threads, many_decodes=True)
        self.store = self.resources["store"].get_store()
        self.force = force
        self.stage = "start"  # what the run is doing, for the one line an interrupt prints
        self.built_something = False  # whether this run materialized anything (the report then is rebuilt)

    def _materialize(self, assets: list, partition_key=None, partition_range: tuple | None = None,
                     many_decodes: bool = False) -> dict:
        """One in-process run of `assets` for one partition or a partition range (start, end); returns
        {asset: metadata} of its materializations (the last one per asset). many_decodes: with the compute resource
        that lets the completions decode compile (compiles_decodes)."""
        tags = {INTERRUPT_TAG: "stop"}  # Ctrl-C / SIGTERM stop this process's runs, never retried (defs/assets.py)
        if partition_range is not None:  # Dagster's own range tags: what a backfill run of several partitions gets
            tags.update({"dagster/asset_partition_range_start": str(partition_range[0]),
                         "dagster/asset_partition_range_end": str(partition_range[1])})
        # INFO: the steps' own progress lines (training epochs, ETA); Dagster's engine events are DEBUG. The full
        # event log is in the instance (UI). Built as dagster.materialize builds it, with zlt's console logger.
        console = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
        resources = self._many_decodes_resources if many_decodes else self.resources
        defs = Definitions(assets=ALL_ASSETS, resources=resources, loggers={"console": zlt_console},
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
        return plain_metadata({e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
                               for e in res.get_asset_materialization_events()})

    def _run_all(self, tasks: list[tuple], labels: list[str] | None = None):
        """Yield (task, {asset: metadata}) for each task (assets, partition key, partition range[, many_decodes]):
        one run each, here one after the other (each `labels` line printed before its run), or with several workers all
        submitted at once (the labels printed then) and yielded as they finish. A failed run raises once the runs
        in progress have finished (their work is committed); interrupts: see _worker_pool."""
        if self.workers == 1:
            for i, task in enumerate(tasks):
                if labels:
                    print(labels[i], flush=True)
                yield task, self._materialize(*task)
            return
        for line in labels or ():
            print(line, flush=True)
        self.built_something = self.built_something or bool(tasks)  # as _materialize says for its runs
        if self.pool is None:
            # spawn: a fresh interpreter per worker, so that its GPU is chosen before CUDA starts in it
            context = multiprocessing.get_context("spawn")
            self._stopping = context.Event()
            self.pool = cf.ProcessPoolExecutor(self.workers, mp_context=context, initializer=_worker_start,
                                               initargs=(self._runner_args, self._stopping))
        # the pool spawns its workers in submit(): they inherit SIGINT blocked, so that a Ctrl-C while they still
        # import does not end them with a KeyboardInterrupt traceback each (_worker_start ignores it, then
        # unblocks it); here it is only held back until the submits are done, then raised as usual
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            futures = {self.pool.submit(_worker_materialize, [a.key.to_user_string() for a in task[0]], *task[1:]):
                       task for task in tasks}
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        for future in cf.as_completed(futures):
            try:
                result = future.result()
            except cf.process.BrokenProcessPool:  # the pool has stopped the other workers already
                raise WorkerRunFailed(f"a worker process ended abruptly (killed, e.g. by the out-of-memory killer, "
                                      f"or crashed) during {self.stage}; finished work is kept: rerun the same "
                                      "command to resume") from None
            yield futures[future], result

    @contextlib.contextmanager
    def _worker_pool(self):
        """The workers live for one `run`. On an interrupt of this process the signal goes on to the workers (a
        SIGTERM sent to this process alone would not reach them; a terminal's Ctrl-C reached them already and
        a second SIGINT is harmless), which stop their runs with a checkpoint; then the pool is closed. Before
        that, on an interrupt or a failure, the stop event tells the workers to start nothing more: the pool
        has already handed them tasks beyond the runs in progress, which cancel_futures does not withdraw."""
        try:
            yield
        except _Signal as e:
            self._stop_workers()
            for child in multiprocessing.active_children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGINT)
            raise RunInterrupted(e.signal_name, self.stage) from e
        finally:
            if self.pool is not None:
                self._stop_workers()
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = None

    def _stop_workers(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

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
                with self._worker_pool():
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
            # with several workers side by side: base ARC needs only the base model
            tasks = ([([a], sid, None) for a in SWEEP_DATA_ASSETS] if self.workers > 1
                     else [(SWEEP_DATA_ASSETS, sid, None)])
            for _ in self._run_all(tasks):
                pass
        else:
            print("[1/3] on-policy data already there: skipped", flush=True)
            if self.store.artifact_problem(layout.base_arc_prefix(sid)):
                self.stage = "base-model ARC"
                # in a worker where there are several: a GPU step in this process would pin it (the compute
                # resource), and every worker spawned later would inherit that one GPU
                for _ in self._run_all([([base_arc_scores], sid, None)]):
                    pass
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
        groups = split_for_workers(contiguous_groups(to_train, ordered, TRAIN_GROUP_SIZE),
                                   {k: cell_by_key[k].epochs for k in to_train}, self.workers)
        self.stage = (f"training pass of {len(to_train)} cell(s)" if len(groups) == 1
                      else f"{len(groups)} training passes of {len(to_train)} cells")
        for _ in self._run_all([([adapter], None, (g[0], g[-1])) for g in groups], labels=[
                f"  training {len(g)} cell(s) in one pass: {', '.join(cell_by_key[k].key for k in g)}"
                for g in groups]):
            pass
        if to_train:
            print(f"  training done in {(time.time() - t_train) / 60:.1f} min", flush=True)
        t_cells = time.time()
        self.stage = "evaluation of the cells"
        many = compiles_decodes(len(todo), self.workers)
        tasks = [([completions, marker_rates, arc_scores], key, None, many) for key in todo]
        for n, (task, meta) in enumerate(self._run_all(tasks), 1):
            key = task[1]
            m = meta[marker_rates.key.to_user_string()]
            elapsed = time.time() - t_cells
            eta = eta_seconds(elapsed, n, len(todo) - n)
            print(f"  cell {len(keys) - len(todo) + n}/{len(keys)} {cell_by_key[key].key}: {m['regime']:13s} "
                  f"source {m['source_adoption']:.2f} assistant {m['assistant_leakage']:.2f} "
                  f"bystander {m['max_bystander_leakage']:.2f} | evaluation elapsed {elapsed / 60:.1f} min, "
                  f"ETA {eta / 60:.1f} min", flush=True)
        # the registry sensor's freshness rule (a cell committed after the report, a report listing missing cells,
        # or one that does not verify), and anything this run built: base ARC is in the report too
        if self.force or self.built_something or report_outdated(self.store, sweep):
            print("[3/3] compiled results + heatmap ...", flush=True)
            self.stage = "compiled results + heatmap"
            self._materialize(REPORT_ASSETS, sid)  # no GPU (no compute resource): here, never pinned
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


