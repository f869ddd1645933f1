"""The `zlt` command drives the asset graph (Dagster runs recorded in the instance), resumes, reports status."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zlt_dagster.cli import main


def test_run_resume_and_status(tmp_path, monkeypatch, capsys):
    """Also: the README's environment variables are the CLI's defaults (ZLT_ARC_SOURCE, ZLT_DEVICE,
    ZLT_ARTIFACT_ROOT: no flag given), and a torn artifact is rebuilt on resume, never counted."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZLT_ARC_SOURCE", "sample")
    monkeypatch.setenv("ZLT_DEVICE", "cpu")
    art = tmp_path / "art"
    monkeypatch.setenv("ZLT_ARTIFACT_ROOT", str(art))
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("protocol: tiny\nbase_model: tiny\nsource_persona: comedian\nseed: 7\n"
                   "cells: [[1.0e-3, 1], [1.0e-2, 2]]\n")
    assert main(["run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "cells: 0 already done, 2 to run" in out
    assert "cell 2/2" in out and "ETA" in out
    # the training pass's progress with its ETA on zlt's console (zlt_console), not only in Dagster's log lines;
    # the tracker decision said once, not at every step
    assert re.search(r"^    adapter: epoch 1/2: 2 cell\(s\) trained, loss .*; ETA \d+\.\d min$", out, re.M), out
    assert out.count("tracking (off): ") == 1 and " - dagster - " not in out, out
    compiled = [p for p in art.rglob("compiled_results.json")]
    assert len(compiled) == 1
    data = json.loads(compiled[0].read_text())
    assert data["n_cells"] == 2 and len(data["cells"]) == 2 and data["source_persona"] == "comedian"
    assert (compiled[0].parents[1] / "heatmap" / "heatmap.png").is_file()
    arc = [json.loads(p.read_text()) for p in art.rglob("arc_scores.json")]
    assert len(arc) == 3 and {a["source"] for a in arc} == {"sample"}  # base + 2 cells: ZLT_ARC_SOURCE honoured

    # the runs are Dagster runs in the instance the UI reads
    from dagster import DagsterInstance
    with DagsterInstance.get() as instance:
        # data+base ARC, 1 training run (the sweep's two cells are the only, so contiguous, keys of the `cells`
        # dimension: one range run trains both in one pass), 2 evaluation runs, report
        assert len(instance.get_runs()) == 1 + 1 + 2 + 1

    # rerun: everything done is skipped, the report too (it was compiled after every cell: registry.report_outdated)
    assert main(["run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "on-policy data already there: skipped" in out and "cells: 2 already done, 0 to run" in out
    assert "[3/3] compiled results + heatmap already up to date: skipped" in out
    with DagsterInstance.get() as instance:
        assert len(instance.get_runs()) == 1 + 1 + 2 + 1  # no new run

    # a torn artifact (a file no longer matching its manifest) is rebuilt on resume, never counted as done
    [torn] = [p for p in art.rglob("marker_rates.json") if "lr=0.01_ep=2" in str(p)]
    torn.write_text(torn.read_text().replace("comedian", "COMEDIAN"))
    assert main(["status"]) == 0
    assert "2 cells, 1 done;" in capsys.readouterr().out
    assert main(["run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "lr=0.01_ep=2: rebuilding, marker_rates: ChecksumError" in out
    assert "cells: 1 already done, 1 to run" in out and "cell 2/2 lr=0.01_ep=2" in out
    assert "[3/3] compiled results + heatmap ...\n" in out  # a cell was rebuilt: so is the report

    for argv in (["--artifacts", str(art), "status"], ["status", "--artifacts", str(art)]):  # before or after
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "comedian" in out and "2 cells, 2 done;" in out and "marker_rates 2" in out
    (tmp_path / "elsewhere").mkdir()
    assert main(["--artifacts", str(tmp_path / "elsewhere"), "status"]) == 0
    assert capsys.readouterr().out.startswith("no sweeps in ")


def test_status_refuses_a_missing_artifact_directory(tmp_path, monkeypatch, capsys):
    """`zlt status --artifacts <typo>` used to exit 0 with "no sweeps in ...", as if the store were empty. A path
    that is not a directory is refused by every command (`zlt run` used to crash in a step on it); `zlt run` and
    `zlt demo` still create a missing directory (test_run_resume_and_status), and `zlt status` before the first run
    with the default directory still says there are no sweeps."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ZLT_ARTIFACT_ROOT", raising=False)
    missing = tmp_path / "artfacts"
    for argv in (["status", "--artifacts", str(missing)], ["--artifacts", str(missing), "status"]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == (f"zlt: error: command line: --artifacts: directory '{missing}' does not exist "
                                     "(zlt run and zlt demo create it)\n")
    monkeypatch.setenv("ZLT_ARTIFACT_ROOT", str(missing))
    assert main(["status"]) == 2
    assert capsys.readouterr().err.startswith(f"zlt: error: environment: ZLT_ARTIFACT_ROOT: directory '{missing}' "
                                              "does not exist")
    monkeypatch.delenv("ZLT_ARTIFACT_ROOT")
    assert main(["status"]) == 0
    assert capsys.readouterr().out == f"no sweeps in {(tmp_path / '.zlt' / 'artifacts').as_uri()}\n"
    afile = tmp_path / "afile"
    afile.write_text("")
    cfg = tmp_path / "s.yaml"
    cfg.write_text(BASE)
    for argv in (["status"], ["demo"], ["run", str(cfg)]):
        assert main([*argv, "--artifacts", str(afile)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"zlt: error: command line: --artifacts: '{afile}' is not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "s.yaml"]  # nothing written
    # a directory that cannot be created (under a file) and an empty path: one line too (a store traceback before;
    # '' silently meant the default directory)
    under = afile / "sub"
    assert main(["run", str(cfg), "--artifacts", str(under)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"zlt: error: command line: --artifacts: cannot create directory '{under}': ")
    assert err.count("\n") == 1
    for argv in (["status"], ["run", str(cfg)]):
        assert main([*argv, "--artifacts", ""]) == 2
        assert capsys.readouterr().err == ("zlt: error: command line: --artifacts: is empty; expected a directory "
                                           "(leave the option out for the default)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "s.yaml"]


# --- config errors: one line `zlt: error: <file>: <field>: <what>`, exit code 2, nothing written ---------------------
BASE = "protocol: tiny\nbase_model: tiny\n"
BAD_CONFIGS = [
    ("cells: []\n", "cells", "is an empty list"),
    ("cells:\n", "cells", "is empty"),
    ("cells: [[1.0e-3]]\n", "cells[0]", "expected a [lr, epochs] pair, got [0.001]"),
    ("cells: [[1.0e-3, 1.7]]\n", "cells[0][1]", "epochs 1.7 is invalid; expected an integer >= 1"),
    ("cells: [[1.0e-3, 0]]\n", "cells[0][1]", "epochs 0 is invalid"),
    ("cells: [[-1.0e-3, 1]]\n", "cells[0][0]", "learning rate -0.001 is invalid; expected a finite number > 0"),
    ("cells: [[.nan, 1]]\n", "cells[0][0]", "learning rate nan is invalid"),
    ("cells: [[5.0e-4, 1]]\n", "cells[0][0]", "learning rate 0.0005 is not in the grid of protocol 'tiny'"),
    ("cells: [[1.0e-3, 9]]\n", "cells[0][1]", "epochs 9 is not in the grid of protocol 'tiny'"),
    ("cells: [[1.0e-3, 1], [1.0e-3, 1]]\n", "cells[1]", "duplicate of cells[0]"),
    ("cells: [[true, 1]]\n", "cells[0][0]", "learning rate True is invalid"),
    ("name: big...sweep\n", "name", "sweep id 'big...sweep' contains ['...'], which Dagster reserves"),
    ("name: ../x\n", "name", "name '../x' must match"),
    ("seed: 1.5\n", "seed", "seed 1.5 must be an integer >= 0"),
    ("source_persona: pirate\n", "source_persona", "unknown source persona 'pirate'"),
    ("lr: 1.0e-3\n", "lr", "unknown field; known: ['protocol'"),
    ("cells: [[1.0e-3, 1]\n", "(file)", "not valid YAML:"),
    ("seed: 1\nseed: 2\n", "(file)", "not valid YAML: duplicate key 'seed' (first at line 3) at line 4, column 1"),
    ("cells: [[1.0e-3, 1]]\nprotocol: tiny\n", "(file)",
     "not valid YAML: duplicate key 'protocol' (first at line 1) at line 4, column 1"),
]


def _only_config_left(tmp_path, cfg) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == [cfg.name], "a config error must write nothing"


def _bad_run(tmp_path, monkeypatch, capsys, text: str, name: str = "bad.yaml"):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZLT_ARTIFACT_ROOT", str(tmp_path / "art"))
    cfg = tmp_path / name
    cfg.write_text(text)
    rc = main(["run", str(cfg)])
    out, err = capsys.readouterr()
    _only_config_left(tmp_path, cfg)
    return rc, out, err, cfg


@pytest.mark.parametrize("extra,field,what", BAD_CONFIGS, ids=[b[0].strip() for b in BAD_CONFIGS])
def test_bad_sweep_file_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, extra, field, what):
    rc, out, err, cfg = _bad_run(tmp_path, monkeypatch, capsys, BASE + extra)
    assert rc == 2 and out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"zlt: error: {cfg}: {field}: {what}"), err


@pytest.mark.parametrize("text,field,what", [
    ("seed: 7\n", "protocol", "missing; expected a protocol name ['demo', 'paper', 'tiny'] or {base: <name>, "),
    ("protocol: tiny\nseed: 7\n", "base_model", "missing; expected smollm2-135m, tiny, a .gguf file, a model "
                                               "directory or a hub id (org/name)"),
], ids=["no protocol", "no base_model"])
def test_a_sweep_file_must_name_its_protocol_and_model(tmp_path, monkeypatch, capsys, text, field, what):
    """A file with only `seed: 7` used to start the 25-cell SmolLM2 demo (protocol demo and the SmolLM2 model were
    silent defaults)."""
    rc, out, err, cfg = _bad_run(tmp_path, monkeypatch, capsys, text)
    assert (rc, out) == (2, "") and err.count("\n") == 1
    assert err.startswith(f"zlt: error: {cfg}: {field}: {what}"), err


def test_missing_model_file_is_named_by_its_field(tmp_path, monkeypatch, capsys):
    rc, out, err, cfg = _bad_run(tmp_path, monkeypatch, capsys, "protocol: tiny\nbase_model: /nonexistent.gguf\n")
    assert (rc, out) == (2, "")
    assert err == f"zlt: error: {cfg}: base_model: GGUF file /nonexistent.gguf does not exist\n"
    (tmp_path / "model_dir").mkdir()
    rc, _, err, _ = _bad_run(tmp_path / "model_dir", monkeypatch, capsys,
                             f"protocol: tiny\nbase_model: {tmp_path / 'model_dir'}\n")
    assert rc == 2 and err.endswith(f"base_model: model directory {tmp_path / 'model_dir'} has no config.json\n")


@pytest.mark.parametrize("protocol,field,what", [
    ("{base: tiny, data: {}}", "protocol.data", "is an empty mapping, which overrides nothing"),
    ("{base: tiny, train: {micro_batch: 1}, train.micro_batch: 2}", "protocol.train.micro_batch",
     "given twice, as a dotted key and inside a mapping; keep one"),
    ("{base: tiny, data: 3, data.n_positives: 2}", "protocol.data", "is a section; expected a mapping, got 3"),
    ("{base: tiny, 1: 2}", "protocol.1", "is not a field name or a dotted path of field names"),
], ids=["empty section", "dotted and nested", "section and dotted", "non-string key"])
def test_protocol_overrides_that_would_be_ignored_are_refused(tmp_path, monkeypatch, capsys, protocol, field, what):
    """`data: {}` was accepted and ignored; of a field given both dotted and nested, the later silently won; a
    section given a value beside a dotted key, or a non-string key, crashed with a traceback (exit 1)."""
    rc, out, err, cfg = _bad_run(tmp_path, monkeypatch, capsys, f"protocol: {protocol}\nbase_model: tiny\n")
    assert (rc, out) == (2, "") and err.count("\n") == 1
    assert err.startswith(f"zlt: error: {cfg}: {field}: {what}"), err


def test_bad_protocol_override_and_bad_json(tmp_path, monkeypatch, capsys):
    rc, _, err, cfg = _bad_run(tmp_path, monkeypatch, capsys, "protocol: {base: tiny, train.micro_batch: two}\n")
    assert rc == 2 and err == f"zlt: error: {cfg}: protocol.train.micro_batch: expected an integer, got 'two'\n"
    cfg.unlink()
    rc, _, err, cfg = _bad_run(tmp_path, monkeypatch, capsys, "protocol: {base: tiny, epochs: []}\n")
    assert rc == 2 and err.startswith(f"zlt: error: {cfg}: protocol.epochs: epochs is empty")
    cfg.unlink()
    rc, _, err, cfg = _bad_run(tmp_path, monkeypatch, capsys, '{"protocol": "tiny",', name="bad.json")
    assert rc == 2 and err.startswith(f"zlt: error: {cfg}: (file): not valid JSON:") and err.count("\n") == 1


def test_bad_environment_and_demo_flags_are_config_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZLT_GENERATION_BACKEND", "fastest")
    assert main(["demo"]) == 2
    assert capsys.readouterr().err.startswith("zlt: error: environment: ZLT_GENERATION_BACKEND: 'fastest' is not one of")
    monkeypatch.delenv("ZLT_GENERATION_BACKEND")
    monkeypatch.setenv("ZLT_TRAIN_COMPILE", "inductr")  # checked before anything runs, not in the adapter step
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == ("zlt: error: environment: ZLT_TRAIN_COMPILE: 'inductr'; expected auto, off "
                                       "or inductor\n")
    monkeypatch.delenv("ZLT_TRAIN_COMPILE")
    assert main(["demo", "--source", "assistant"]) == 2
    assert capsys.readouterr().err.startswith("zlt: error: zlt demo: source_persona: source persona 'assistant' leaves")
    assert list(tmp_path.iterdir()) == []


def test_console_script_exits_2_with_one_line(tmp_path):
    """The installed `zlt` entry point itself (not just main()): exit code 2, no traceback."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text(BASE + "cells: []\n")
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "ZLT_ARTIFACT_ROOT": str(tmp_path / "art"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([str(Path(sys.executable).parent / "zlt"), "run", str(cfg)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"zlt: error: {cfg}: cells: is an empty list; list [lr, epochs] pairs, or leave the " \
                          "field out to run the whole grid\n"
    _only_config_left(tmp_path, cfg)


def test_eta_of_the_evaluation_is_time_per_cell_times_cells_left():
    """Training runs first, in one pass with its own ETA; what is left after it is the same evaluation per cell."""
    from zlt_dagster.defs.runner import eta_seconds

    assert eta_seconds(30.0, 2, 4) == 60.0
    assert eta_seconds(30.0, 2, 0) == 0.0
    assert eta_seconds(0.0, 0, 5) == 0.0


def test_deployment_environment_picks_the_store_of_every_command(tmp_path, monkeypatch, capsys, s3_server_url,
                                                                 aws_env):
    """ZLT_DEPLOYMENT=production + ZLT_S3_*: `zlt status` reads the S3 store the Dagster definitions use (after the
    conditional-write probe); a bad ZLT_DEPLOYMENT is a config error."""
    from zlt_dagster.storage import S3Store

    S3Store("zlt-cli-test", endpoint_url=s3_server_url).create_bucket_if_missing()
    monkeypatch.setenv("ZLT_DEPLOYMENT", "production")
    monkeypatch.setenv("ZLT_S3_BUCKET", "zlt-cli-test")
    monkeypatch.setenv("ZLT_S3_PREFIX", "p1")
    monkeypatch.setenv("ZLT_S3_ENDPOINT_URL", s3_server_url)
    assert main(["status"]) == 0
    assert capsys.readouterr().out == "no sweeps in s3://zlt-cli-test/p1\n"
    from zlt_dagster import settings
    from zlt_dagster.defs import definitions

    assert definitions.DEPLOYMENTS is settings.DEPLOYMENTS  # one list, read by `zlt` and the definitions
    # a fresh process (the console script): the deployment is checked before the definitions are imported
    env = {**os.environ, "ZLT_DEPLOYMENT": "cloud", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([str(Path(sys.executable).parent / "zlt"), "status"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "zlt: error: environment: ZLT_DEPLOYMENT: 'cloud' is not one of ['local', 'production']\n"
    assert list(tmp_path.iterdir()) == []


# --- settings and flags with a fixed set of values: one line, exit code 2, before anything is written ---------------
BAD_SETTINGS = [
    ({"ZLT_DEVICE": "gpu"}, [], "environment: ZLT_DEVICE: 'gpu' is not a device; expected auto, cpu, cuda or cuda:<n>"),
    ({"ZLT_TRACKING": "mlfow"}, [],
     "environment: ZLT_TRACKING: 'mlfow' is not one of ['off', 'file', 'mlflow', 'wandb']"),
    ({"ZLT_CUDNN_SDPA": "maybe"}, [],
     "environment: ZLT_CUDNN_SDPA: 'maybe'; expected 0 or 1 (or false/true, no/yes, off/on)"),
    ({"ZLT_STORE_LOCKS": "o"}, [],
     "environment: ZLT_STORE_LOCKS: 'o'; expected 0 or 1 (or false/true, no/yes, off/on)"),
    ({"ZLT_TORCH_THREADS": "-3"}, [], "environment: ZLT_TORCH_THREADS: '-3'; expected an integer >= 0"),
    ({}, ["--device", "gpu"], "command line: --device: 'gpu' is not a device; expected auto, cpu, cuda or cuda:<n>"),
    ({}, ["--threads", "-2"], "command line: --threads: '-2'; expected an integer >= 0"),
    ({}, ["--threads", "two"], "command line: --threads: 'two'; expected an integer >= 0"),
    ({}, ["--device", "cuda:99"], "command line: --device: 'cuda:99', but torch sees"),
    ({}, ["--gpus", "0"], "command line: --gpus: '0'; expected auto or an integer >= 1"),
    # str.isdigit() takes these, int() does not: they crashed with a ValueError traceback
    ({}, ["--gpus", "\u00b2"], "command line: --gpus: '\u00b2'; expected auto or an integer >= 1"),
    ({}, ["--threads", "\u00b9"], "command line: --threads: '\u00b9'; expected an integer >= 0"),
    ({"ZLT_GPUS": "two"}, [], "environment: ZLT_GPUS: 'two'; expected auto or an integer >= 1"),
    ({"CUDA_VISIBLE_DEVICES": "0"}, ["--gpus", "2"], "command line: --gpus: '2', but 1 GPU(s) are visible here"),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, ["--gpus", "2", "--device", "cpu"],
     "command line: --gpus: '2' with device 'cpu': several GPUs need device auto or cuda"),
]
if importlib.util.find_spec("vllm") is None:  # CI and this machine: asking for vLLM is a config error up front
    BAD_SETTINGS += [
        ({}, ["--backend", "vllm"], "command line: --backend: 'vllm', but vllm does not import here"),
        ({"ZLT_GENERATION_BACKEND": "vllm"}, [],
         "environment: ZLT_GENERATION_BACKEND: 'vllm', but vllm does not import here"),
    ]


@pytest.mark.parametrize("env,flags,message", BAD_SETTINGS, ids=[m.split(": ")[1] + "=" + (m.split("'")[1])
                                                                 for _, _, m in BAD_SETTINGS])
def test_bad_setting_or_flag_is_one_line_exit_2_before_anything(tmp_path, monkeypatch, capsys, env, flags, message):
    """Each used to pass `zlt` and fail inside a step (retried, ~80 s, a long traceback, the sweep registered first)
    or be taken silently (ZLT_STORE_LOCKS=o meant "on", --threads -2 reached torch)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZLT_ARTIFACT_ROOT", str(tmp_path / "art"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(BASE + "source_persona: villain\nseed: 1\n")
    for argv in (["demo", *flags], ["run", str(cfg), *flags]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith(f"zlt: error: {message}"), err
    _only_config_left(tmp_path, cfg)


def test_the_dagster_definitions_refuse_a_bad_setting_when_they_load(monkeypatch):
    """The other entry point (dagster dev, the daemon, step pods): the same check, naming the variable."""
    from zlt_dagster.defs.definitions import build_definitions
    from zlt_dagster.settings import SettingsError

    monkeypatch.setenv("ZLT_TRACKING", "mlfow")
    with pytest.raises(SettingsError, match="^ZLT_TRACKING: 'mlfow' is not one of"):
        build_definitions("local")


def test_a_sweep_name_taken_by_another_config_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """It used to end in a Python traceback (StepError through the runner), exit 1."""
    from zlt_dagster import steps
    from zlt_dagster.defs.registry import sweep_from_config
    from zlt_dagster.storage.local import LocalStore

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZLT_ARTIFACT_ROOT", str(tmp_path / "art"))
    steps.register_sweep(LocalStore(tmp_path / "art"), sweep_from_config(
        {"protocol": "tiny", "base_model": "tiny", "seed": 1, "name": "mine"}))
    cfg = tmp_path / "s.yaml"
    cfg.write_text("protocol: tiny\nbase_model: tiny\nseed: 9\nname: mine\n")
    assert main(["run", str(cfg)]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"zlt: error: {cfg}: name: sweep id 'mine' already exists"), err


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip, not a model"], ids=["empty", "not gguf"])
def test_a_gguf_path_that_is_not_a_gguf_file_is_a_config_error(tmp_path, monkeypatch, capsys, content):
    """An empty or wrong file named .gguf used to pass validation and fail inside the first model step."""
    bogus = tmp_path.parent / f"{tmp_path.name}-bogus.gguf"  # outside tmp_path: the check below wants it empty
    bogus.write_bytes(content)
    rc, out, err, cfg = _bad_run(tmp_path, monkeypatch, capsys, f"protocol: tiny\nbase_model: {bogus}\n")
    assert (rc, out) == (2, "") and err.count("\n") == 1
    assert err.startswith(f"zlt: error: {cfg}: base_model: {bogus} is not a GGUF file (its first bytes are"), err


def test_duplicate_keys_in_a_json_sweep_file_are_refused(tmp_path, monkeypatch, capsys):
    """JSON kept the last of two `seed`s silently (YAML already refused them)."""
    rc, out, err, cfg = _bad_run(tmp_path, monkeypatch, capsys,
                                 '{"protocol": "tiny", "base_model": "tiny", "seed": 1, "seed": 3}', name="s.json")
    assert (rc, out) == (2, "")
    assert err == f"zlt: error: {cfg}: (file): not valid JSON: duplicate key 'seed'\n"


def test_export_refuses_a_file_an_unwritable_path_and_another_sweeps_export(tmp_path, monkeypatch, capsys):
    """`zlt export SWEEP DIR`: DIR may be new, empty, or an earlier export of the same sweep (updated); a file, a
    path that cannot be a directory, or a directory holding anything else (another sweep's export would be
    mixed into this one's, file by file) is one line, exit code 2, nothing written."""
    from zlt_dagster import steps
    from zlt_dagster.defs.registry import load_sweep_config
    from zlt_dagster.steps import layout
    from zlt_dagster.storage import LocalStore

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    art = tmp_path / "art"
    store = LocalStore(str(art))
    cfgs = []
    for seed in (1, 2):  # two sweeps with (stand-in) compiled results
        cfg = tmp_path / f"s{seed}.yaml"
        cfg.write_text(BASE + f"seed: {seed}\n")
        sweep = load_sweep_config(str(cfg))
        steps.register_sweep(store, sweep)
        store.commit_bytes_artifact(layout.compiled_prefix(sweep.sweep_id), {"compiled_results.json": b"{}"})
        cfgs.append(str(cfg))

    def export(cfg, out):
        code = main(["--artifacts", str(art), "export", cfg, str(out)])
        return code, capsys.readouterr()

    out = tmp_path / "out"
    assert export(cfgs[0], out)[0] == 0 and (out / "compiled_results.json").is_file()
    assert export(cfgs[0], out)[0] == 0  # the same sweep again: updated in place
    (out / "run.log").write_text("a log kept beside the export\n")
    assert export(cfgs[0], out)[0] == 0
    before = sorted(p.name for p in out.iterdir())
    code, (_, err) = export(cfgs[1], out)
    assert code == 2 and err.count("\n") == 1 and "holds the export of another sweep" in err, err
    assert sorted(p.name for p in out.iterdir()) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    code, (_, err) = export(cfgs[1], other)
    assert code == 2 and err.count("\n") == 1 and "is not empty and holds no sweep export" in err, err
    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad in (afile, afile / "sub"):
        code, (_, err) = export(cfgs[0], bad)
        assert code == 2 and err.count("\n") == 1 and err.startswith("zlt: error: command line: DIR: "), err
    assert export(cfgs[1], tmp_path / "empty")[0] == 0
