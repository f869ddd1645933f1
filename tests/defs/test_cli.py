"""The `zlt` command drives the asset graph (Dagster runs recorded in the instance), resumes, reports status."""
from __future__ import annotations

import json

from zlt_dagster.cli import main


def test_run_resume_and_status(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("protocol: tiny\nbase_model: tiny\nsource_persona: comedian\nseed: 7\n"
                   "cells: [[1.0e-3, 1], [1.0e-2, 2]]\n")
    art = str(tmp_path / "art")
    assert main(["--artifacts", art, "run", str(cfg), "--arc-source", "sample", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cells: 0 already done, 2 to run" in out
    assert "cell 2/2" in out and "ETA" in out and "tok/s" in out
    compiled = [p for p in (tmp_path / "art").rglob("compiled_results.json")]
    assert len(compiled) == 1
    data = json.loads(compiled[0].read_text())
    assert data["n_cells"] == 2 and len(data["cells"]) == 2 and data["source_persona"] == "comedian"
    assert (compiled[0].parents[1] / "heatmap" / "heatmap.png").is_file()

    # the runs are Dagster runs in the instance the UI reads
    from dagster import DagsterInstance
    with DagsterInstance.get() as instance:
        assert len(instance.get_runs()) == 1 + 2 + 1  # data+base ARC, 2 cells, compile+heatmap

    # rerun: everything done is skipped
    assert main(["--artifacts", art, "run", str(cfg), "--arc-source", "sample", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "on-policy data already there: skipped" in out and "cells: 2 already done, 0 to run" in out

    assert main(["--artifacts", art, "status"]) == 0
    out = capsys.readouterr().out
    assert "comedian" in out and "marker_rates 2" in out


def test_eta_counts_epochs_of_the_cells_left():
    """Training time grows with epochs, the rest of a cell does not: after one 1-epoch cell that trained 10 s of
    its 30 s, cells of 2 and 3 epochs need 2 x 20 s + (2 + 3) x 10 s."""
    from zlt_dagster.defs.runner import eta_seconds

    assert eta_seconds(30.0, 10.0, [1], [2, 3]) == 90.0
    assert eta_seconds(30.0, 10.0, [1], []) == 0.0
    assert eta_seconds(0.0, 0.0, [], [1, 2]) == 0.0
    # the demo's grid order (epochs 1..5 per LR): the estimate after the first cell is larger than the naive one
    left = [2, 3, 4, 5] + [1, 2, 3, 4, 5] * 4
    assert eta_seconds(36.0, 6.0, [1], left) > 36.0 * len(left)
