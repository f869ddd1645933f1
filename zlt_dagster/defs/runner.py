"""Drive one sweep through the asset graph in-process: what `zlt demo` / `zlt run` do.

Each step is `dagster.materialize` for one partition, recorded in the instance at $DAGSTER_HOME (default
./.dagster_home, the same one `dagster dev` uses from the repo root), so the UI shows every run and its metadata.
One process keeps one copy of the base model for all cells. Finished cells are skipped (resume)."""
from __future__ import annotations

import os
import time
from pathlib import Path

DEFAULT_HOME = ".dagster_home"
DEFAULT_ARTIFACTS = ".zlt/artifacts"


def _instance_home() -> Path:
    """DAGSTER_HOME, defaulting to ./.dagster_home with a dagster.yaml equal to the repo's (absolute paths)."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path(DEFAULT_HOME).resolve())
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(
            "# written by `zlt`: same storage as the repo's dagster.yaml, with absolute paths\n"
            f"storage:\n  sqlite:\n    base_dir: {home / 'storage'}\n"
            f"local_artifact_storage:\n  module: dagster._core.storage.root\n  class: LocalArtifactStorage\n"
            f"  config:\n    base_dir: {home}\n"
            "telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _resources(artifacts, device: str, backend: str, arc_source: str, threads: int) -> dict:
    """``artifacts``: a local directory, or an ArtifactStore resource (the CLI's store from the environment)."""
    from .resources import ArtifactStore, Compute

    store = (artifacts if isinstance(artifacts, ArtifactStore)
             else ArtifactStore(kind="local", local_root=str(Path(artifacts).resolve())))
    return {"store": store,
            "compute": Compute(device=device, generation_backend=backend, arc_source=arc_source,
                               torch_threads=threads)}


def eta_seconds(elapsed: float, train_s: float, epochs_done: list[int], epochs_left: list[int]) -> float:
    """Time left for the remaining cells. Training time grows with a cell's epochs, the rest (evaluation, commits)
    does not: the grid runs 1-epoch cells first, so elapsed / cells done would underestimate the rest ~1.5x
    (the demo's first ETA said 13.4 min; it took 19.3)."""
    if not epochs_done:
        return 0.0
    per_epoch = train_s / max(sum(epochs_done), 1)
    per_cell = max(elapsed - train_s, 0.0) / len(epochs_done)
    return per_cell * len(epochs_left) + per_epoch * sum(epochs_left)


class Runner:
    """Materializes one sweep partition by partition, printing progress (cells done, tokens/s, ETA)."""

    def __init__(self, artifacts: str, device: str = "auto", backend: str = "auto", arc_source: str = "",
                 threads: int = 0, force: bool = False):
        from dagster import DagsterInstance

        _instance_home()
        self.instance = DagsterInstance.get()
        self.resources = _resources(artifacts, device, backend, arc_source, threads)
        self.store = self.resources["store"].get_store()
        self.force = force

    def _materialize(self, assets: list, partition_key) -> dict:
        from dagster import materialize

        from .assets import ALL_ASSETS

        # Dagster's console logger would print ~10 DEBUG lines per step; the progress lines below say what matters
        # and the full event log is in the instance (UI).
        quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
        res = materialize(ALL_ASSETS, selection=assets, partition_key=partition_key, instance=self.instance,
                          resources=self.resources, raise_on_error=True, run_config=quiet)
        return {e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
                for e in res.get_asset_materialization_events()}

    def run(self, sweep) -> dict:
        from .. import layout, pipeline
        from .assets import CELL_ASSETS, base_arc_scores, compiled_results, heatmap, onpolicy_data
        from .partitions import cell_from_position, partition_keys_for, split_partition_key, sweep_partitions

        pipeline.register_sweep(self.store, sweep)
        if not self.instance.has_dynamic_partition(sweep_partitions.name, sweep.sweep_id):
            self.instance.add_dynamic_partitions(sweep_partitions.name, [sweep.sweep_id])
        sid = sweep.sweep_id
        print(f"sweep {sid}: {len(sweep.cells())} cells, protocol {sweep.protocol.name}, source "
              f"{sweep.source_persona}, seed {sweep.seed}, model {sweep.base_model}", flush=True)
        t_start = time.time()
        if self.force or self.store.artifact_problem(layout.onpolicy_prefix(sid)):  # verified, not just present
            print("[1/3] on-policy data + base-model ARC ...", flush=True)
            self._materialize([onpolicy_data, base_arc_scores], sid)
        else:
            print("[1/3] on-policy data already there: skipped", flush=True)
            if self.store.artifact_problem(layout.base_arc_prefix(sid)):
                self._materialize([base_arc_scores], sid)
        keys = partition_keys_for(sweep)
        done = set()
        for cell in [] if self.force else sweep.cells():  # pipeline.cell_problem: the verified "cell done" check
            problem = pipeline.cell_problem(self.store, sweep, cell)
            if problem is None:
                done.add(cell.key)
            elif not problem.endswith(" missing"):  # torn or corrupt: rebuilt, never counted
                print(f"  {cell.key}: rebuilding, {problem}", flush=True)
        todo = [k for k in keys if self.force or
                cell_from_position(sweep, split_partition_key(k)[1]).key not in done]
        print(f"[2/3] cells: {len(keys) - len(todo)} already done, {len(todo)} to run", flush=True)
        t_cells, tokens, train_s = time.time(), 0, 0.0
        epochs = [cell_from_position(sweep, split_partition_key(k)[1]).epochs for k in todo]
        for n, key in enumerate(todo, 1):
            meta = self._materialize(CELL_ASSETS, key)
            a, m = meta["adapter"], meta["marker_rates"]
            tokens += a["tokens"].value
            train_s += a["wall_s"].value
            elapsed = time.time() - t_cells
            eta = eta_seconds(elapsed, train_s, epochs[:n], epochs[n:])
            print(f"  cell {len(keys) - len(todo) + n}/{len(keys)} {a['cell'].value}: {m['regime'].value:13s} "
                  f"source {m['source_adoption'].value:.2f} assistant {m['assistant_leakage'].value:.2f} "
                  f"bystander {m['max_bystander_leakage'].value:.2f} | train {tokens / max(train_s, 1e-9):.0f} tok/s"
                  f" | elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", flush=True)
        print("[3/3] compiled results + heatmap ...", flush=True)
        self._materialize([compiled_results, heatmap], sid)
        out = {"sweep_id": sid, "wall_s": round(time.time() - t_start, 1),
               "compiled": self.store.uri(f"{layout.compiled_prefix(sid)}/compiled_results.json"),
               "heatmap_png": self.store.uri(f"{layout.heatmap_prefix(sid)}/heatmap.png"),
               "heatmap_pdf": self.store.uri(f"{layout.heatmap_prefix(sid)}/heatmap.pdf")}
        print(f"done in {out['wall_s'] / 60:.1f} min\n  compiled results: {out['compiled']}\n"
              f"  heatmap:          {out['heatmap_png']}\n                    {out['heatmap_pdf']}\n"
              f"  open the UI with `dagster dev` (from the repo root) to browse runs and metadata", flush=True)
        return out


