"""Step `adapter`: train 1..N cells in one pass (core/train.train_cells) and commit one adapter per cell."""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

from ..core import checkpoint
from ..core.protocol import Cell, Sweep
from ..core.train import tokenize_dataset, train_cells
from ..storage import ObjectStore
from . import layout
from .checkpoints import StoreCheckpoints
from .common import ComputeSettings, Log, StepError, artifact_meta, model, require
from .onpolicy import load_onpolicy


def run_adapter(store: ObjectStore, sweep: Sweep, cell: Cell, compute: ComputeSettings, log: Log = print) -> dict:
    """One cell: `run_adapters` with a group of one."""
    return run_adapters(store, sweep, [cell], compute, log)[cell]


def run_adapters(store: ObjectStore, sweep: Sweep, cells: list[Cell], compute: ComputeSettings,
                 log: Log = print, retrain: bool = True) -> dict[Cell, dict]:
    """Train a group of cells in one pass (core/train.train_cells) and commit one adapter artifact per cell.

    Each cell resumes from its newest committed checkpoint if a previous attempt died (SIGKILL, evicted pod);
    checkpoints go to sweeps/<id>/cells/<cell>/checkpoint/ and are deleted once that cell's adapter is committed.
    With `retrain=False` a cell whose adapter is already committed is not trained again: its summary is read from
    the committed run record (`reused: True`). One trainer per cell at a time: the group holds every cell's lease
    (a second concurrent run of any of them waits, then raises LeaseHeldError). Returns {cell: summary}: the run
    record's fields (train_run.json without the loss curve, protocol and versions), `artifact` and `reused`."""
    if not cells:
        raise StepError("run_adapters: no cells to train")
    done: dict[Cell, dict] = {}
    if not retrain:
        for cell in cells:
            prefix = layout.cell_prefix(sweep.sweep_id, cell, "adapter")
            if store.artifact_problem(prefix) is None:  # verified: a torn adapter is trained again
                record = json.loads(store.read_artifact_file(prefix, "train_run.json"))
                done[cell] = {**_train_summary(record), "artifact": store.uri(prefix), "reused": True}
    todo = [c for c in cells if c not in done]
    if not todo:
        return done
    data = load_onpolicy(store, sweep)
    lm = model(sweep, compute)
    backend = compute.compile_backend(lm)
    examples = tokenize_dataset(lm, data, sweep.protocol)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=compute.work_dir or None)))
        leases, ckpts, cks = {}, {}, []
        for cell in todo:
            leases[cell] = (stack.enter_context(store.lease(
                layout.training_lock_key(sweep.sweep_id, cell), ttl_s=compute.lease_ttl_s,
                wait_s=1.5 * compute.lease_ttl_s, purpose=f"train {cell.key}"))
                if store.locks_enabled() else contextlib.nullcontext())
            ckpts[cell] = StoreCheckpoints(store, layout.checkpoint_prefix(sweep.sweep_id, cell), log)
            local = tmp / cell.key / "checkpoints"
            local.mkdir(parents=True)
            cks.append(checkpoint.Checkpointer(
                local, sweep.protocol.train.checkpoint_every_steps, resume_dir=ckpts[cell].pull_latest(local),
                on_saved=_pusher(ckpts[cell], leases[cell]),
                log=lambda m, key=cell.key: log(f"{key}: {m}")))  # a pass trains many cells: say which
        outs = [tmp / cell.key / "adapter" for cell in todo]

        def commit(j: int, record: dict) -> None:  # as soon as a cell finishes, not at the end of the pass
            cell, out = todo[j], outs[j]
            (out / "sweep.json").write_text(sweep.to_json())
            (out / "README.md").unlink(missing_ok=True)  # peft's model-card stub says nothing about this run
            prefix = layout.cell_prefix(sweep.sweep_id, cell, "adapter")
            getattr(leases[cell], "check", lambda: None)()
            store.commit_artifact(prefix, out, meta=artifact_meta(sweep, cell=cell.key, data_hash=data.data_hash))
            ckpts[cell].clear()  # only once the final adapter is committed
            done[cell] = {**_train_summary(record), "artifact": store.uri(prefix), "reused": False}
            log(f"adapter {cell.key} committed ({record['steps']} steps, final loss {record['final_loss']})")

        try:
            train_cells(lm, examples, sweep.protocol, todo, sweep.seed, outs, data_hash=data.data_hash,
                        progress=log, checkpointers=cks, on_cell_done=commit, compile_backend=backend)
        except checkpoint.CheckpointError as e:  # a checkpoint of another run (e.g. other on-policy data)
            log(f"stored checkpoint not usable ({e}); deleting the group's checkpoints and training from step 0")
            for cell, ck in zip(todo, cks):
                ckpts[cell].clear()
                ck.resume_dir = None
            train_cells(lm, examples, sweep.protocol, todo, sweep.seed, outs, data_hash=data.data_hash,
                        progress=log, checkpointers=cks, on_cell_done=commit, compile_backend=backend)
    return {cell: done[cell] for cell in cells}


def _pusher(ckpts: StoreCheckpoints, lease):
    def push(path: Path, step: int, reason: str) -> None:
        getattr(lease, "check", lambda: None)()  # a trainer that lost its lease stops instead of overwriting
        ckpts.push(path, step, reason)
    return push


def _train_summary(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("loss_curve", "protocol", "versions")}


def fetch_adapter(store: ObjectStore, sweep: Sweep, cell: Cell, dest: str) -> str:
    """Download the cell's committed adapter into ``dest`` (every file's sha256 verified); returns its path.
    StepError when it was never committed."""
    prefix = layout.cell_prefix(sweep.sweep_id, cell, "adapter")
    require(store, prefix, f"adapter for {cell.key}")
    return str(store.fetch_artifact(prefix, dest))
