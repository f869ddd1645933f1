"""Run steps.run_adapter for one cell in its own process, so a test can SIGKILL/SIGTERM it like a pod.

    python tests/reliability/train_cell_proc.py STORE_ROOT SWEEP_ID LR EPOCHS [--delay S] [--ticks FILE]
    python tests/reliability/train_cell_proc.py STORE_ROOT SWEEP_ID 0 0 --cells LR:EP,LR:EP,... [--keep-done]

--cells trains a group of cells in one pass (steps.run_adapters); --keep-done reuses committed adapters.

--delay slows every forward pass (so a test has time to kill it mid-run); --ticks appends one byte per forward
pass to FILE (so a test knows which step is running). Exit 143 after TrainingInterrupted (SIGTERM handled).
"""
from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("sweep_id")
    ap.add_argument("lr", type=float)
    ap.add_argument("epochs", type=int)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--ticks", default="")
    ap.add_argument("--lease-ttl", type=float, default=3.0)
    ap.add_argument("--cells", default="")
    ap.add_argument("--keep-done", action="store_true")
    a = ap.parse_args()

    from zlt_dagster import steps
    from zlt_dagster.core import train
    from zlt_dagster.core.checkpoint import TrainingInterrupted
    from zlt_dagster.core.protocol import Cell
    from zlt_dagster.storage import LocalStore

    real = train.block_loss_sums

    def slow(model, batch, k, *args, **kwargs):  # whatever else the trainer passes (full_logits, decoder) goes on
        if a.ticks:
            with open(a.ticks, "ab") as fh:
                fh.write(b".")
        time.sleep(a.delay)
        return real(model, batch, k, *args, **kwargs)

    train.block_loss_sums = slow
    store = LocalStore(a.root)
    store.lock_ttl_s = a.lease_ttl  # a commit lease left by a SIGKILL expires quickly in tests
    sweep = steps.load_sweep(store, a.sweep_id)
    compute = steps.ComputeSettings(device="cpu", torch_threads=1, lease_ttl_s=a.lease_ttl)
    try:
        if a.cells:
            cells = [Cell(float(lr), int(ep)) for lr, ep in (c.split(":") for c in a.cells.split(","))]
            recs = steps.run_adapters(store, sweep, cells, compute, log=lambda m: print(m, flush=True),
                                         retrain=not a.keep_done)
            print("DONE " + " ".join(f"{c.key}:{r['steps']}" for c, r in recs.items()), flush=True)
            return 0
        rec = steps.run_adapter(store, sweep, Cell(a.lr, a.epochs), compute, log=lambda m: print(m, flush=True))
    except TrainingInterrupted as e:
        print(f"INTERRUPTED step={e.step} signal={e.signum}: {e}", flush=True)
        return 143
    print(f"DONE steps={rec['steps']} resumed_from_step={rec['resumed_from_step']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
