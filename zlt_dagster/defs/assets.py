"""The assets. Each body: partition -> (sweep, cell) through the partitions codec, call one step
(zlt_dagster/steps), turn its summary into metadata (metadata.to_result: summary keys are metadata names)."""

import base64
import functools
import signal
import warnings
from pathlib import Path
from typing import Callable

from dagster import (
    AssetDep, AssetExecutionContext, BackfillPolicy, Backoff, BetaWarning, Config, DagsterExecutionInterruptedError,
    Failure, MaterializeResult, MetadataValue, MultiToSingleDimensionPartitionMapping, RetryPolicy, asset,
)
from pydantic import Field

from .. import settings, steps
from ..core import report
from ..core.checkpoint import TrainingInterrupted
from ..core.models import ModelLoadError
from ..core.protocol import ProtocolError, Sweep
from ..storage import ChecksumError, NotFoundError, UnsafeKeyError
from ..storage.base import ConditionalWritesUnsupportedError, StoreAccessError
from .k8s_tags import CPU_OP_TAGS, GPU_OP_TAGS
from .metadata import metadata, to_result
from .partitions import SWEEP_DIM, CellKeyError, cell_of, split_partition_key, sweep_cell_partitions, sweep_partitions
from .resources import ArtifactStore, Compute
from .tracking import start_tracking

GROUP = "zlt_sweep"
# transient faults (a preempted pod, an object-store hiccup) retry with backoff; bad input fails at once
GPU_RETRY = RetryPolicy(max_retries=2, delay=20, backoff=Backoff.EXPONENTIAL)
# CPU steps (rates, compile, heatmap, comparison) take seconds and fail transiently only on storage: retry sooner
# and once more (5 s, 10 s, 20 s) than GPU steps, whose retry re-queues for a GPU.
CPU_RETRY = RetryPolicy(max_retries=3, delay=5, backoff=Backoff.EXPONENTIAL)
# Dagster 1.13 marks this mapping and `asset(backfill_policy=...)` beta and warns on every import of this module,
# i.e. on every `zlt` command: the project pins dagster (pyproject.toml) and tests both uses
# (tests/defs/test_train_groups.py), so exactly these two warnings are silenced, where they are raised.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=BetaWarning,
                            message=r"Class `MultiToSingleDimensionPartitionMapping` is currently in beta")
    PER_SWEEP = MultiToSingleDimensionPartitionMapping(partition_dimension_name=SWEEP_DIM)
# A backfill of `adapter` runs up to this many partitions per run, trained in one pass (Dagster's own grouping,
# dagster-io/dagster BackfillPolicy). Measured on dagster 1.13.27 (tests/defs/test_train_groups.py): a whole sweep
# or any run of partitions contiguous in Dagster's key order (the cell order of the `cells` dimension) becomes one run per
# chunk; a selection with gaps becomes one run per contiguous stretch (at worst one per partition, never wrong).
TRAIN_GROUP_SIZE = settings.train_group_size()  # read when the definitions load
TRAIN_BACKFILL_POLICY = BackfillPolicy.multi_run(TRAIN_GROUP_SIZE)
# (MaskingError and ArcDataError are ValueErrors.) Transient: other StoreErrors (network, 5xx, LeaseHeldError),
# TrainingInterrupted (SIGTERM; the retry resumes from its checkpoint), CUDA/OOM errors.
BAD_INPUT = (ProtocolError, steps.StepError, CellKeyError, ChecksumError, NotFoundError, UnsafeKeyError,
             StoreAccessError, ConditionalWritesUnsupportedError, ModelLoadError, ValueError)


def _bad_input_fails_once(fn: Callable):
    try:
        return fn()
    except BAD_INPUT as e:
        raise Failure(description=f"{type(e).__name__}: {e}", allow_retries=False) from e


# A run tagged `zlt/on_interrupt: stop` (what `zlt run` launches in its own process, defs/runner.py) stops on Ctrl-C
# or SIGTERM. Without it, Dagster's own handling applies: inside a step an interrupt is raised as
# DagsterExecutionInterruptedError and, because every asset has a RetryPolicy, turned into a retry (20 s later the
# step ran again and the whole training pass finished: Ctrl-C did nothing), which is what a step pod evicted by
# Kubernetes wants (the retry resumes from the checkpoint) and what a user at a terminal does not.
INTERRUPT_TAG = "zlt/on_interrupt"


class StepInterrupted(Failure):
    """A step of a `zlt/on_interrupt: stop` run stopped on SIGINT/SIGTERM; never retried. ``signal_name`` is
    SIGINT or SIGTERM where the step knows it (training does), else ''."""

    def __init__(self, step: str, what: str, signal_name: str = ""):
        super().__init__(description=f"{step}: {what}", allow_retries=False,
                         metadata={"interrupted": signal_name or "signal"})
        self.step, self.what, self.signal_name = step, what, signal_name


def _stops_on_interrupt(fn: Callable):
    """Asset body wrapper: in a run tagged INTERRUPT_TAG=stop, an interrupt (training's TrainingInterrupted after
    its checkpoint, or Dagster's DagsterExecutionInterruptedError raised wherever the step was) fails the step as
    StepInterrupted, bypassing the retry policy; in any other run it propagates unchanged."""
    @functools.wraps(fn)
    def body(context, *args, **kwargs):
        try:
            return fn(context, *args, **kwargs)
        except (TrainingInterrupted, DagsterExecutionInterruptedError, KeyboardInterrupt) as e:
            if context.run.tags.get(INTERRUPT_TAG) != "stop":
                raise
            step = context.asset_key.to_user_string()
            if isinstance(e, TrainingInterrupted):
                what = f"training stopped after step {e.step}/{e.total_steps}, checkpoint committed"
                raise StepInterrupted(step, what, signal.Signals(e.signum).name if e.signum else "") from e
            raise StepInterrupted(step, "interrupted") from e
    return body


def _tracked(track, fn: Callable):
    """The step's core call: bad input fails once (no retry); any failure closes the tracker run as failed."""
    try:
        return _bad_input_fails_once(fn)
    except BaseException:
        track.fail()
        raise


def _sweep(context: AssetExecutionContext, store: ArtifactStore) -> Sweep:
    return _bad_input_fails_once(lambda: steps.load_sweep(store.get_store(), context.partition_key))


def _sweep_cell(context: AssetExecutionContext, store: ArtifactStore):
    def resolve():
        sweep_id, key = split_partition_key(context.partition_key)
        sweep = steps.load_sweep(store.get_store(), sweep_id)
        return sweep, cell_of(sweep, key)
    return _bad_input_fails_once(resolve)


def _sweep_groups(context: AssetExecutionContext, store: ArtifactStore) -> list[tuple[Sweep, list]]:
    """The run's partitions (one, or a backfill's range) as [(sweep, [(partition key, cell), ...]), ...]."""
    def resolve():
        by_sweep: dict[str, list] = {}
        for key in context.partition_keys:
            sweep_id, cell = split_partition_key(sweep_cell_partitions.get_partition_key_from_str(key))
            by_sweep.setdefault(sweep_id, []).append((key, cell))
        groups = []
        for sweep_id, keys in by_sweep.items():
            sweep = steps.load_sweep(store.get_store(), sweep_id)
            cells, outside = [], []
            for key, cell in keys:
                try:
                    cells.append((key, cell_of(sweep, cell)))
                except CellKeyError:
                    outside.append(cell)
            if outside:  # before any training: a group run is all or nothing in Dagster's records
                raise CellKeyError(
                    f"cell(s) {', '.join(outside)} ({len(outside)} of this run's {len(keys)} partitions) are not one "
                    f"of sweep {sweep_id}'s chosen cells ({', '.join(c.key for c in sweep.cells())}); materialize "
                    f"only those (the registry sensor and `zlt run` do)")
            groups.append((sweep, cells))
        return groups
    return _bad_input_fails_once(resolve)


def _figure_md(alt: str, fig_or_png) -> MetadataValue:
    """A figure (matplotlib Figure or PNG bytes) as markdown metadata: the UI shows it in its figure dialog, sized
    by core/report.png_dpi to fit there at 100% zoom."""
    png = fig_or_png if isinstance(fig_or_png, bytes) else report.png_bytes(fig_or_png)
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


ADAPTER_KEYS = ("steps", "steps_with_nonzero_lr", "tokens", "supervised_tokens", "tokens_per_s", "wall_s", "gpu_s",
                "first_loss", "final_loss", "micro_batch", "micro_batches", "cells_per_forward", "group", "reused",
                "device", "artifact")


def adapter_metadata(sweep, cell, s: dict) -> dict:
    """A cell's adapter metadata from its run summary (`group`: the pass's figures when this cell finished and
    was committed; a reused record of an older version may lack fields: shown as absent, never invented)."""
    return to_result(s, ADAPTER_KEYS, sweep=sweep, cell=cell).metadata


ONPOLICY_KEYS = ("kept", "positives", "negatives", "cut_first_pass", "dropped_cut", "dropped_empty_or_marked",
                 "mean_answer_tokens", "marker_token_count", "marker_token_ids", "marker_tokens", "marker_separator",
                 "stop_token_ids", "stop_tokens", "data_hash", "new_tokens", "tokens_per_s", "gen_batch_size",
                 "gen_batch_size_source", "generation_passes", "wall_s", "gpu_s", "artifact")


@asset(partitions_def=sweep_partitions, group_name=GROUP, op_tags=GPU_OP_TAGS, retry_policy=GPU_RETRY,
       kinds={"pytorch"})
@_stops_on_interrupt
def onpolicy_data(context: AssetExecutionContext, store: ArtifactStore, compute: Compute) -> MaterializeResult:
    """The base model's own answers under every persona (T=0.7); the marker appended to the source's answers.
    Fails before generating when the chat template cannot be masked or the marker's sub-token count differs from
    protocol.marker_token_count; shows the marker's sub-tokens and the stop ids used."""
    sweep = _sweep(context, store)
    track = start_tracking(context, sweep.sweep_id)
    s = _tracked(track, lambda: steps.run_onpolicy(store.get_store(), sweep, compute.settings(),
                                                   context.log.info))
    return track(to_result(s, ONPOLICY_KEYS, sweep=sweep))


with warnings.catch_warnings():  # the beta warning of backfill_policy (see PER_SWEEP)
    warnings.filterwarnings("ignore", category=BetaWarning,
                            message=r"Parameter `backfill_policy` of function `asset` is currently in beta")
    _adapter_asset = asset(partitions_def=sweep_cell_partitions, group_name=GROUP, op_tags=GPU_OP_TAGS,
                           retry_policy=GPU_RETRY, deps=[AssetDep(onpolicy_data, partition_mapping=PER_SWEEP)],
                           kinds={"pytorch"}, backfill_policy=TRAIN_BACKFILL_POLICY)


@_adapter_asset
@_stops_on_interrupt
def adapter(context: AssetExecutionContext, store: ArtifactStore, compute: Compute) -> MaterializeResult:
    """One LoRA adapter per (LR, epochs) cell, marker-only loss. A run of several partitions (a backfill, grouped
    by the asset's BackfillPolicy, ZLT_TRAIN_GROUP_SIZE) trains them in one pass over the frozen base
    (core/train.py) and still commits one adapter artifact and one materialization per partition."""
    st = store.get_store()
    # a retry of this step (preempted pod, SIGTERM) or a re-execution of a failed run ("retry from failure")
    # keeps the adapters the failed attempt already committed (cells with fewer epochs finish first) and resumes
    # the others from their checkpoints; a new materialization retrains every partition it names
    resumed = context.retry_number > 0 or "dagster/parent_run_id" in context.run.tags
    for sweep, group in _sweep_groups(context, store):
        cells = [cell for _, cell in group]
        # one tracker run per cell (a group also gets one for the pass), opened before compute so that a tracker
        # that cannot honour its project name fails here
        track = start_tracking(context, sweep.sweep_id, cells[0].key if len(cells) == 1 else f"{len(cells)}cells")
        summaries = _tracked(track, lambda: steps.run_adapters(st, sweep, cells, compute.settings(),
                                                               context.log.info, retrain=not resumed))
        metas = {key: adapter_metadata(sweep, cell, summaries[cell]) for key, cell in group}
        if len(group) > 1:
            trained = [x for x in summaries.values() if not x.get("reused")]
            last = max(trained, key=lambda x: x["group"]["wall_s"]) if trained else None  # the whole pass
            track(MaterializeResult(metadata={"cells": len(cells), "reused": len(cells) - len(trained),
                                              **({"pass_wall_s": last["group"]["wall_s"],
                                                  "pass_tokens_per_s": last["group"]["tokens_per_s"]}
                                                 if last else {})}))
        for key, cell in group:
            cell_track = track if len(group) == 1 else start_tracking(context, sweep.sweep_id, cell.key)
            context.add_asset_metadata(cell_track(MaterializeResult(metadata=metas[key])).metadata,
                                       partition_key=key)
    return MaterializeResult()


COMPLETIONS_KEYS = ("n_completions", "new_tokens", "tokens_per_s", "cut_at_limit", "wall_s", "gpu_s", "backend",
                    "gen_batch_size", "gen_batch_size_source", "stop_token_ids", "stop_tokens", "artifact")


@asset(partitions_def=sweep_cell_partitions, group_name=GROUP, op_tags=GPU_OP_TAGS, retry_policy=GPU_RETRY,
       deps=[adapter], kinds={"pytorch"})
@_stops_on_interrupt
def completions(context: AssetExecutionContext, store: ArtifactStore, compute: Compute) -> MaterializeResult:
    """Every persona x held-out question x samples, T=1.0, all kept as JSONL."""
    sweep, cell = _sweep_cell(context, store)
    track = start_tracking(context, sweep.sweep_id, cell.key)
    s = _tracked(track, lambda: steps.run_completions(store.get_store(), sweep, cell,
                                                      compute.settings(), context.log.info))
    return track(to_result(s, COMPLETIONS_KEYS, sweep=sweep, cell=cell))


@asset(partitions_def=sweep_cell_partitions, group_name=GROUP, op_tags=CPU_OP_TAGS, retry_policy=CPU_RETRY,
       deps=[completions])
@_stops_on_interrupt
def marker_rates(context: AssetExecutionContext, store: ArtifactStore) -> MaterializeResult:
    """Per-persona [ZLT] rates (k of n, Wilson 95%), headline numbers, lengths, regime label."""
    sweep, cell = _sweep_cell(context, store)
    track = start_tracking(context, sweep.sweep_id, cell.key)
    s = _tracked(track, lambda: steps.run_marker_rates(store.get_store(), sweep, cell))
    table = "| persona | k/n | rate | 95% CI | mean tokens | near-empty |\n|---|---|---|---|---|---|\n" + "".join(
        f"| {p} | {r['k']}/{r['n']} | {r['rate']:.3f} | {r['ci_low']:.3f}-{r['ci_high']:.3f} | "
        f"{r['mean_tokens']:.1f} | {r['short_share']:.2f} |\n" for p, r in s["personas"].items())
    figure = report.build_cell_figure(s, f"{sweep.sweep_id} | lr {cell.lr:g}, {cell.epochs} epochs: {s['regime']}")[0]
    return track(to_result(s, ("regime", "artifact"), sweep=sweep, cell=cell, flatten=("headline",),
                           per_persona=MetadataValue.md(table), figure=_figure_md("marker rates", figure)))


ARC_KEYS = ("acc", "acc_norm", "n", "source", "convention", "adapter", "arc_batch_size", "arc_batch_size_source",
            "continuations_per_s", "wall_s", "gpu_s", "artifact")


@asset(partitions_def=sweep_cell_partitions, group_name=GROUP, op_tags=GPU_OP_TAGS, retry_policy=GPU_RETRY,
       deps=[adapter], kinds={"pytorch"})
@_stops_on_interrupt
def arc_scores(context: AssetExecutionContext, store: ArtifactStore, compute: Compute) -> MaterializeResult:
    """ARC-Challenge log-prob multiple choice (lm-eval arc_challenge convention) for base + this adapter."""
    sweep, cell = _sweep_cell(context, store)
    track = start_tracking(context, sweep.sweep_id, cell.key)
    s = _tracked(track, lambda: steps.run_arc(store.get_store(), sweep, cell, compute.settings(), context.log.info))
    return track(to_result(s, ARC_KEYS, sweep=sweep, cell=cell))


@asset(partitions_def=sweep_partitions, group_name=GROUP, op_tags=GPU_OP_TAGS, retry_policy=GPU_RETRY,
       kinds={"pytorch"})
@_stops_on_interrupt
def base_arc_scores(context: AssetExecutionContext, store: ArtifactStore, compute: Compute) -> MaterializeResult:
    """ARC-Challenge of the base model without adapter: the reference every cell is compared with."""
    sweep = _sweep(context, store)
    track = start_tracking(context, sweep.sweep_id)
    s = _tracked(track, lambda: steps.run_base_arc(store.get_store(), sweep, compute.settings(), context.log.info))
    return track(to_result(s, ARC_KEYS, sweep=sweep))


@asset(partitions_def=sweep_partitions, group_name=GROUP, op_tags=CPU_OP_TAGS, retry_policy=CPU_RETRY,
       deps=[AssetDep(marker_rates, partition_mapping=PER_SWEEP), AssetDep(arc_scores, partition_mapping=PER_SWEEP),
             AssetDep(adapter, partition_mapping=PER_SWEEP), base_arc_scores])
@_stops_on_interrupt
def compiled_results(context: AssetExecutionContext, store: ArtifactStore) -> MaterializeResult:
    """One JSON with every finished cell of the sweep; missing cells are listed, never invented."""
    sweep = _sweep(context, store)
    track = start_tracking(context, sweep.sweep_id)
    s = _tracked(track, lambda: steps.run_compile(store.get_store(), sweep))
    return track(to_result(s, ("n_cells", "missing_cells", "base_model_arc", "artifact"), sweep=sweep))


@asset(partitions_def=sweep_partitions, group_name=GROUP, op_tags=CPU_OP_TAGS, retry_policy=CPU_RETRY,
       deps=[compiled_results])
@_stops_on_interrupt
def heatmap(context: AssetExecutionContext, store: ArtifactStore) -> MaterializeResult:
    """Three LR x epochs panels: source adoption, assistant leakage, max bystander leakage (PNG + PDF)."""
    sweep = _sweep(context, store)
    track = start_tracking(context, sweep.sweep_id)
    s = _tracked(track, lambda: steps.run_heatmap(store.get_store(), sweep))
    return track(to_result(s, ("n_cells", "artifact", "png_uri", "pdf_uri"), sweep=sweep,
                           heatmap=_figure_md("heatmap", s["png"])))


class ComparisonConfig(Config):
    followup: str = Field(default="configs/followups/extra_seeds.yaml",
                          description="a follow-up file with `compare:` (configs/followups/), relative to the code "
                                      "location's working directory")


@asset(group_name=GROUP, op_tags=CPU_OP_TAGS, retry_policy=CPU_RETRY, deps=[marker_rates])
@_stops_on_interrupt
def cell_comparison(context: AssetExecutionContext, config: ComparisonConfig, store: ArtifactStore
                    ) -> MaterializeResult:
    """The same cell across seeds or marker tail widths (a follow-up file): rates with Wilson 95% intervals."""
    # tracked like every step; its project is named for the follow-up file, as it spans several sweeps
    track = start_tracking(context, f"comparison-{Path(config.followup).stem}")
    s = _tracked(track, lambda: steps.run_comparison(store.get_store(), config.followup))
    return track(MaterializeResult(metadata={
        "followup": config.followup, **metadata(s["comparison"], ("varying", "n_done", "n_expected")),
        **metadata(s, ("artifact", "png_uri")), "comparison": _figure_md("comparison", s["png"])}))


SWEEP_DATA_ASSETS = [onpolicy_data, base_arc_scores]
CELL_ASSETS = [adapter, completions, marker_rates, arc_scores]
REPORT_ASSETS = [compiled_results, heatmap]
ALL_ASSETS = [*SWEEP_DATA_ASSETS, *CELL_ASSETS, *REPORT_ASSETS, cell_comparison]
