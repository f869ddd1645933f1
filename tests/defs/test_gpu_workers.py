"""Several GPUs on one host: each process pinned to its own GPU (defs/gpu_pinning.py), `zlt run --gpus N` with one
worker per GPU (defs/runner.py), and the split of the training grid into balanced passes. On the CPU the GPUs are
CUDA_VISIBLE_DEVICES entries: pinning only chooses and locks them, which is all that is tested here."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zlt_dagster.core.protocol import PROTOCOLS
from zlt_dagster.defs import gpu_pinning
from zlt_dagster.defs.runner import balanced_parts, contiguous_groups, split_for_workers, worker_count

ROOT = Path(__file__).resolve().parents[2]


# --- splitting the grid into passes -------------------------------------------------------------------------------
def test_balanced_parts_is_the_best_contiguous_split():
    costs = [1, 3, 5, 10, 20] * 5  # the paper grid, LR-major: a cell costs its epochs
    for parts in range(1, 8):
        cuts = balanced_parts(costs, parts)
        bounds = [0, *cuts, len(costs)]
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        # brute force over every split into `parts` pieces (small enough for 2-3 pieces)
        if parts <= 3:
            import itertools
            best = min(max(sum(costs[a:b]) for a, b in zip([0, *c, 25], [*c, 25]))
                       for c in itertools.combinations(range(1, 25), parts - 1))
            assert worst == best
        assert len(cuts) == parts - 1 and all(b > a for a, b in zip(bounds, bounds[1:]))


def test_two_gpus_get_two_contiguous_passes_of_equal_work():
    cells = PROTOCOLS["paper"].cells()
    keys, cost = [c.key for c in cells], {c.key: c.epochs for c in cells}
    groups = split_for_workers(contiguous_groups(keys, keys, 25), cost, 2)
    assert [sum(cost[k] for k in g) for g in groups] == [97, 98]  # of 195 epoch-passes
    assert [k for g in groups for k in g] == keys  # every cell once, in order: each piece a partition range
    assert split_for_workers(contiguous_groups(keys, keys, 25), cost, 1) == [keys]
    # passes already cut by the group size are cut further only as far as the workers need
    groups = split_for_workers(contiguous_groups(keys, keys, 10), cost, 2)
    assert [len(g) for g in groups] == [10, 10, 5]
    # more workers than cells: one cell per pass, never an empty one
    assert split_for_workers([keys[:3]], cost, 8) == [[k] for k in keys[:3]]


def test_worker_count(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert worker_count("auto", "auto") == 3 and worker_count("auto", "cuda") == 3
    assert worker_count("auto", "cpu") == 1 and worker_count("auto", "cuda:1") == 1 and worker_count(2, "auto") == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CUDA's convention: no GPU
    assert worker_count("auto", "auto") == 1


# --- pinning ------------------------------------------------------------------------------------------------------
PIN = textwrap.dedent("""
    import sys, time
    from zlt_dagster.defs import gpu_pinning
    gpu = gpu_pinning.pin_gpu(sys.argv[1], log=lambda m: print(m, flush=True), poll_s=0.05)
    import os
    print("GPU", gpu, os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
    time.sleep(float(sys.argv[2]))
""")


def _pin_proc(lock_dir, hold_s: float, visible: str = "0,1") -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", PIN, str(lock_dir), str(hold_s)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _gpu_line(proc) -> str:
    while True:
        line = proc.stdout.readline()
        assert line, "the process ended without pinning"
        if line.startswith("GPU "):
            return line.split()[1]


def test_processes_take_distinct_gpus_and_a_third_waits_for_one(tmp_path):
    a, b = _pin_proc(tmp_path, 30), _pin_proc(tmp_path, 30)
    try:
        assert {_gpu_line(a), _gpu_line(b)} == {"0", "1"}
        c = _pin_proc(tmp_path, 0)
        time.sleep(3)
        assert c.poll() is None  # waiting: both GPUs are held
        a.kill()  # a killed holder frees its GPU (the kernel drops the flock)
        a.wait()
        gpu = _gpu_line(c)
        c.wait(timeout=30)
        assert gpu in ("0", "1")
    finally:
        for p in (a, b):
            p.kill()


def test_one_visible_gpu_is_never_pinned_and_pinning_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_pinning, "_PINNED", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert gpu_pinning.pin_gpu(tmp_path) is None and gpu_pinning.pinned_gpu() is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa,GPU-bbb")  # UUIDs work as indices do
    lines = []
    assert gpu_pinning.pin_gpu(tmp_path, log=lines.append) == "GPU-aaa"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-aaa" and lines == ["pinned to GPU GPU-aaa of GPU-aaa,GPU-bbb"]
    assert gpu_pinning.pin_gpu(tmp_path) == "GPU-aaa"  # the process keeps its GPU
    gpu_pinning._PINNED["lock"].close()


def test_pinning_after_cuda_started_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_pinning, "_PINNED", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(gpu_pinning.GpuPinningError, match="CUDA started in this process before a GPU was pinned"):
        gpu_pinning.pin_gpu(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing locked


# --- zlt run --gpus 2 ---------------------------------------------------------------------------------------------
def test_zlt_run_with_two_gpus_trains_two_passes_in_two_pinned_workers(tmp_path, monkeypatch, capfd):
    """Two workers, each pinned to its own (CUDA_VISIBLE_DEVICES) GPU, train two passes at once and evaluate the
    cells between them; every cell is done and recorded, and a cell trained by a worker equals the same cell
    trained alone in this process."""
    from zlt_dagster import steps
    from zlt_dagster.cli import main
    from zlt_dagster.defs.registry import load_sweep_config
    from zlt_dagster.storage import LocalStore

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZLT_ARC_SOURCE", "sample")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("ZLT_GPU_LOCK_DIR", str(tmp_path / "locks"))
    art = tmp_path / "art"
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("protocol: tiny\nbase_model: tiny\nsource_persona: comedian\nseed: 7\n"
                   "cells: [[1.0e-3, 1], [1.0e-3, 2], [1.0e-2, 1], [1.0e-2, 2]]\n")
    assert main(["--artifacts", str(art), "run", str(cfg), "--gpus", "2"]) == 0
    out = capfd.readouterr().out
    passes = re.findall(r"^  training 2 cell\(s\) in one pass: (.*)$", out, re.M)
    assert passes == ["lr=0.001_ep=1, lr=0.001_ep=2", "lr=0.01_ep=1, lr=0.01_ep=2"], out  # 1+2 | 1+2 epochs
    pinned = re.findall(r"worker (\d+): pinned to GPU (\d) of 0,1", out)
    assert len(pinned) == 2 and {g for _, g in pinned} == {"0", "1"}, out
    assert "cell 4/4" in out and "[3/3] compiled results + heatmap ..." in out
    assert main(["--artifacts", str(art), "status"]) == 0
    assert "4 cells, 4 done;" in capfd.readouterr().out

    from dagster import DagsterInstance
    with DagsterInstance.get() as instance:
        runs = instance.get_runs()
        # on-policy and base ARC side by side, 2 training passes, 4 evaluations, the report
        assert len(runs) == 2 + 2 + 4 + 1 and all(r.is_success for r in runs)

    store = LocalStore(str(art))
    sweep = steps.as_stored(store, load_sweep_config(str(cfg)))
    cell = sweep.cells()[3]  # lr 1e-2, 2 epochs: trained by the second worker
    alone = LocalStore(str(tmp_path / "alone"))
    for key in store.list_keys(f"sweeps/{sweep.sweep_id}/onpolicy") + [f"sweeps/{sweep.sweep_id}/sweep.json"]:
        alone.put_bytes(key, store.get_bytes(key))
    steps.run_adapters(alone, sweep, [cell], steps.ComputeSettings(device="cpu"), log=lambda _m: None)
    weights = [load_file(s.fetch_artifact(f"sweeps/{sweep.sweep_id}/cells/{cell.key}/adapter", tmp_path / n)
                         / "adapter_model.safetensors") for s, n in ((store, "w"), (alone, "a"))]
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        # fp32: a 2-cell pass sums in another order than a 1-cell one (equal in float64: tests/core/test_train_group.py),
        # and Adam at lr 1e-2 carries that into the weights: up to 5.1e-5 on weights of ~0.1 (2026-12-01, peft 0.21.2,
        # numpy 2.4.6; torch's thread count alone moves them ~1e-7). 1e-5 had passed with the packages before.
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-3, atol=1e-4)
    record = json.loads((art / "sweeps" / sweep.sweep_id / "cells" / cell.key / "adapter" / "train_run.json")
                        .read_text())
    assert record["device"] == "cpu"

    # `zlt export`: the shareable results of the sweep (what results/ holds), no machine paths
    out = tmp_path / "exported"
    assert main(["--artifacts", str(art), "export", str(cfg), str(out), "--samples", "2"]) == 0
    assert capfd.readouterr().out.startswith(f"{sweep.sweep_id}: 4 cells, ")
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert names == {"sweep.json", "compiled_results.json", "heatmap.png", "heatmap.pdf", "onpolicy_stats.json",
                     "base_arc_scores.json"} | {f"cells/{c.key}/{f}" for c in sweep.cells() for f in (
                         "train_run.json", "completions_stats.json", "completions_sample.jsonl",
                         "marker_rates.json", "arc_scores.json")}
    sample = [json.loads(x) for x in (out / "cells" / cell.key / "completions_sample.jsonl").read_text().splitlines()]
    per_persona = {p: sum(r["persona"] == p for r in sample) for p in sweep.protocol.personas}
    assert set(per_persona.values()) == {2}, per_persona
    assert not [p for p in out.rglob("*.json") if str(tmp_path) in p.read_text()]
    never = tmp_path / "never.yaml"
    never.write_text("protocol: tiny\nbase_model: tiny\nseed: 99\n")
    assert main(["--artifacts", str(art), "export", str(never), str(out)]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "was never run in" in err, err


def test_base_arc_alone_runs_in_a_worker_and_the_runner_never_pins_itself(tmp_path, monkeypatch, capfd):
    """A rerun whose on-policy data is there but whose base ARC is not (a run stopped in [1/3], where the two run
    side by side) scores base ARC in a worker: the runner's own process must not take a GPU, or every worker it
    spawns afterwards inherits that one GPU's CUDA_VISIBLE_DEVICES and they all share it."""
    import shutil

    from zlt_dagster.cli import main

    monkeypatch.setattr(gpu_pinning, "_PINNED", {})  # this process pins nothing (asserted below)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZLT_ARC_SOURCE", "sample")
    monkeypatch.setenv("ZLT_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the first run: one process, no GPU to pin
    art, cfg = tmp_path / "art", tmp_path / "sweep.yaml"
    cfg.write_text("protocol: tiny\nbase_model: tiny\nseed: 3\ncells: [[1.0e-3, 1]]\n")
    assert main(["--artifacts", str(art), "run", str(cfg), "--gpus", "1"]) == 0
    (base_arc,) = (art / "sweeps").glob("*/base_arc")
    shutil.rmtree(base_arc)
    capfd.readouterr()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert main(["--artifacts", str(art), "run", str(cfg), "--gpus", "2"]) == 0
    out = capfd.readouterr().out
    assert gpu_pinning.pinned_gpu() is None and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1", out
    assert re.search(r"worker \d+: pinned to GPU [01] of 0,1", out), out
    assert base_arc.is_dir()
    assert "[3/3] compiled results + heatmap ...\n" in out, out  # base ARC is in the report: rebuilt


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a reparented zombie may linger where init does not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _zlt_run_gpus2(tmp_path, seed: int, cells: str, **extra_env) -> tuple[list[str], dict]:
    """The command and environment of `zlt run --gpus 2` of a tiny sweep in its own process, two GPUs faked."""
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "ZLT_ARC_SOURCE": "sample",
           "CUDA_VISIBLE_DEVICES": "0,1", "ZLT_GPU_LOCK_DIR": str(tmp_path / "locks"), "PYTHONPATH": str(ROOT),
           **extra_env}
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"protocol: tiny\nbase_model: tiny\nseed: {seed}\ncells: {cells}\n")
    return [sys.executable, "-m", "zlt_dagster.cli", "--artifacts", str(tmp_path / "art"), "run", str(cfg),
            "--gpus", "2"], env


def _read_until(proc: subprocess.Popen, done) -> list[str]:
    """proc's stdout lines up to and including the first for which done(line) holds (or to its end)."""
    out = []
    for line in proc.stdout:
        out.append(line)
        if done(line):
            break
    return out


def test_sigterm_stops_every_worker_and_no_queued_pass_starts_then_a_rerun_finishes(tmp_path):
    """SIGTERM to `zlt run --gpus 2` alone (not its workers): the two passes in progress stop with a checkpoint,
    the passes still queued for the workers never start (the pool hands a worker its next task before the
    interrupt), the run ends with its one line and 143, no worker is left, and the same command resumes and
    finishes every cell."""
    import signal

    # four one-cell passes for two workers: two of them queued
    cmd, env = _zlt_run_gpus2(tmp_path, 5, "[[1.0e-3, 3], [3.0e-3, 3], [1.0e-2, 3], [3.0e-2, 3]]",
                              ZLT_TRAIN_GROUP_SIZE="1")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = _read_until(proc, lambda line: "adapter: epoch 1/3" in line)
        assert out and "epoch 1/3" in out[-1], "".join(out)
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    out = "".join(out) + rest
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert err.strip().splitlines()[-1].startswith("zlt: interrupted by SIGTERM during 4 training passes"), err
    assert "Traceback" not in err, err
    assert "committed (9 steps" not in out, out  # no pass ran to its end after the signal
    assert len(re.findall(r"adapter: training 1 cell\(s\) in one pass: micro-batch", out)) <= 2, out
    workers = [int(p) for p in re.findall(r"worker (\d+): pinned", out)]
    assert workers and not [p for p in workers if _alive(p)], out

    done = subprocess.run(cmd, env=env, cwd=ROOT, text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    status = subprocess.run(cmd[:5] + ["status"], env=env, cwd=ROOT, text=True, capture_output=True)
    assert "4 cells, 4 done;" in status.stdout, status.stdout + status.stderr


def test_a_step_failing_in_a_worker_is_one_line_after_its_traceback(tmp_path, monkeypatch, capfd):
    """A bad input in a worker's step: the worker prints the step's traceback, the run stops (exit code 1, as a
    crash in one process) and ends with one line naming the step and the error, not a second traceback of the
    process pool's plumbing."""
    from zlt_dagster.cli import main

    bad = tmp_path / "arc.jsonl"
    bad.write_text('{"bad": 1}\n')
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZLT_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("protocol: tiny\nbase_model: tiny\nseed: 4\ncells: [[1.0e-3, 1]]\n")
    assert main(["--artifacts", str(tmp_path / "art"), "run", str(cfg), "--gpus", "2", "--arc-source",
                 str(bad)]) == 1
    err = capfd.readouterr().err
    assert "ArcDataError" in err and "concurrent.futures" not in err and "_RemoteTraceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"zlt: base_arc_scores \(\w+\) failed in worker \d+: ArcDataError: .*missing field.*; "
                        r"its traceback is above", last), last


def test_a_worker_killed_outright_ends_the_run_with_one_line(tmp_path):
    """A worker killed outright (SIGKILL: the out-of-memory killer) breaks the pool, which stops the other worker:
    the run ends with exit code 1 and one line saying what happened, not the pool's BrokenProcessPool traceback;
    no worker is left."""
    import signal

    cmd, env = _zlt_run_gpus2(tmp_path, 6, "[[1.0e-3, 5], [3.0e-3, 5]]")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = []
    try:
        out = _read_until(proc, lambda line: "adapter: epoch 1/5" in line)
        workers = [int(p) for p in re.findall(r"worker (\d+): pinned", "".join(out))]
        assert len(workers) == 2, "".join(out)
        os.kill(workers[0], signal.SIGKILL)
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, "".join(out) + rest + err
    assert "Traceback" not in err and "BrokenProcessPool" not in err, err
    # (after it, multiprocessing's resource tracker may warn of the semaphore the killed worker never released)
    zlt = [x for x in err.splitlines() if x.startswith("zlt:")]
    assert len(zlt) == 1 and re.fullmatch(r"zlt: a worker process ended abruptly .* during 2 training passes of 2 "
                                          r"cells; finished work is kept: rerun the same command to resume",
                                          zlt[0]), err
    assert not [p for p in workers if _alive(p)]


def test_ctrl_c_while_the_workers_start_is_one_line(tmp_path):
    """Ctrl-C (SIGINT to the whole process group) while the workers are still starting (importing torch and
    Dagster, before they set SIGINT aside): no KeyboardInterrupt traceback from each worker's bootstrap, exit code
    130 with the one line, no worker left and no task started."""
    import signal

    cmd, env = _zlt_run_gpus2(tmp_path, 8, "[[1.0e-3, 1]]")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out = _read_until(proc, lambda line: line.startswith("[1/3]"))
        time.sleep(0.5)  # the pool is spawning its workers
        os.killpg(proc.pid, signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(out) + rest
    assert proc.returncode == 128 + signal.SIGINT, out + err
    assert "spawn_main" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].startswith("zlt: interrupted by SIGINT during on-policy data"), err
    assert "onpolicy_data:" not in out, out  # no task started after the interrupt
    workers = [int(p) for p in re.findall(r"worker (\d+): pinned", out)]
    assert not [p for p in workers if _alive(p)], out


def test_the_compute_resource_pins_a_step_to_a_free_gpu(tmp_path):
    """What steps launched by Dagster itself get (the UI, a backfill, the multiprocess executor: each step or run in
    its own process): the `compute` resource takes a free GPU when the step starts; GPU 0 is held here, so the
    step's process gets GPU 1. An explicit cuda:<n> is left alone."""
    import fcntl

    (tmp_path / "locks").mkdir()
    held = open(tmp_path / "locks" / "gpu-0.lock", "a")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    script = textwrap.dedent("""
        import os, sys
        from dagster import build_init_resource_context
        from zlt_dagster.defs.resources import Compute
        Compute(device=sys.argv[1]).setup_for_execution(build_init_resource_context())
        print("CUDA_VISIBLE_DEVICES=" + os.environ["CUDA_VISIBLE_DEVICES"])
    """)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1", "ZLT_GPU_LOCK_DIR": str(tmp_path / "locks"),
           "PYTHONPATH": str(ROOT)}
    try:
        for device, want in (("auto", "1"), ("cuda:0", "0,1")):
            out = subprocess.run([sys.executable, "-c", script, device], env=env, text=True, capture_output=True,
                                 timeout=120)
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip().splitlines()[-1] == f"CUDA_VISIBLE_DEVICES={want}", out.stdout + out.stderr
    finally:
        held.close()
