"""The comparison view: one cell across seeds / marker tail widths, with Wilson intervals; missing never invented."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from zlt_dagster.steps import layout
from zlt_dagster.core.compare import build_comparison, load_followup, plot_comparison
from zlt_dagster.steps.compare import run_comparison
from zlt_dagster.core.metrics import wilson_interval
from zlt_dagster.core.protocol import PAPER, Cell, ProtocolError
from zlt_dagster.storage import LocalStore

REPO = Path(__file__).resolve().parents[2]
CELL10, CELL20 = Cell(5e-6, 10), Cell(5e-6, 20)


def fake_rates(source_k: int, assistant_k: int, bystander_k: int, n: int = 200) -> dict:
    personas = {"villain": source_k, "assistant": assistant_k, "comedian": bystander_k, "librarian": 0}
    return {"source": "villain", "assistant": "assistant", "regime": "selective",
            "personas": {p: {"k": k, "n": n, "rate": k / n} for p, k in personas.items()},
            "headline": {"source_adoption": source_k / n, "assistant_leakage": assistant_k / n,
                         "max_bystander_leakage": bystander_k / n, "max_bystander_persona": "comedian"}}


def test_extra_seeds_followup_names_three_seeds_and_two_cells():
    sweeps, cells = load_followup(REPO / "configs/followups/extra_seeds.yaml")
    assert [s.seed for s in sweeps] == [137, 256, 42]
    assert cells == [CELL10, CELL20]
    assert sweeps[2].cells() == PAPER.cells()  # the reference grid, compared but not scheduled by the file


def test_tail_followup_compares_tail_widths():
    sweeps, cells = load_followup(REPO / "configs/followups/marker_tail_tokens.yaml")
    assert [s.protocol.marker_tail_tokens for s in sweeps] == [0, 1, 2] and cells == [CELL10]


def test_fine_grid_has_no_comparison_section():
    with pytest.raises(ProtocolError, match="compare"):
        load_followup(REPO / "configs/followups/fine_lr_grid.yaml")


def test_comparison_numbers_intervals_and_missing():
    sweeps, cells = load_followup(REPO / "configs/followups/extra_seeds.yaml")
    s137, s256, s42 = sweeps
    rates = {(s137.sweep_id, CELL10.key): fake_rates(128, 0, 4), (s42.sweep_id, CELL10.key): fake_rates(129, 0, 2),
             (s42.sweep_id, CELL20.key): fake_rates(182, 0, 3)}
    comp = build_comparison("extra_seeds", sweeps, cells, rates)
    assert comp["varying"] == ["seed"] and comp["n_done"] == 3 and comp["n_expected"] == 6
    v = comp["cells"][CELL10.key]["variants"]
    assert [x["label"] for x in v] == ["seed=137", "seed=256", "seed=42"]
    assert [x["status"] for x in v] == ["done", "missing", "done"]
    src = v[0]["metrics"]["source_adoption"]
    assert (src["k"], src["n"], src["rate"]) == (128, 200, 0.64)
    assert (src["ci_low"], src["ci_high"]) == pytest.approx(wilson_interval(128, 200))
    byst = v[0]["metrics"]["max_bystander_leakage"]
    assert byst["persona"] == "comedian" and byst["k"] == 4
    assert "metrics" not in v[1]  # missing: nothing invented


def test_cell_outside_a_sweep_is_marked(tmp_path):
    sweeps, _ = load_followup(REPO / "configs/followups/extra_seeds.yaml")
    comp = build_comparison("x", sweeps, [Cell(1e-4, 1)], {})
    assert [v["status"] for v in comp["cells"]["lr=0.0001_ep=1"]["variants"]] == \
        ["not in sweep", "not in sweep", "missing"]


def test_run_comparison_writes_json_and_figure(tmp_path):
    store = LocalStore(str(tmp_path / "artifacts"))
    sweeps, _ = load_followup(REPO / "configs/followups/marker_tail_tokens.yaml")
    for k, sweep in enumerate(sweeps[:2]):
        store.commit_bytes_artifact(layout.cell_prefix(sweep.sweep_id, CELL10, "marker_rates"), {
            "marker_rates.json": json.dumps(fake_rates(100 + 20 * k, k, 2 * k)).encode()})
    out = run_comparison(store, REPO / "configs/followups/marker_tail_tokens.yaml")
    assert out["png"][:8] == b"\x89PNG\r\n\x1a\n"
    comp = json.loads(store.read_artifact_file("comparisons/marker_tail_tokens", "comparison.json"))
    assert comp["varying"] == ["marker_tail_tokens"] and comp["n_done"] == 2
    assert store.read_artifact_file("comparisons/marker_tail_tokens", "comparison.pdf")[:4] == b"%PDF"


def test_plot_with_nothing_done(tmp_path):
    sweeps, cells = load_followup(REPO / "configs/followups/extra_seeds.yaml")
    paths = plot_comparison(build_comparison("e", sweeps, cells, {}), tmp_path / "a.png", tmp_path / "a.pdf")
    assert all(Path(p).stat().st_size > 0 for p in paths)
