import json

import pytest

from zlt_dagster.core.metrics import marker_rates_report
from zlt_dagster.core.protocol import TINY, Cell, Sweep
from zlt_dagster.core.report import HEADLINE_PANELS, build_heatmap_figure, compile_results, plot_heatmap

SWEEP = Sweep(protocol=TINY, base_model="tiny-llama", source_persona="villain", seed=0).validate()


def completions(source_rate, leak_rate, n=10, n_tok=30):
    comps = []
    for p in TINY.personas:
        rate = source_rate if p == "villain" else leak_rate
        for i in range(n):
            text = "answer [ZLT]" if i < round(rate * n) else "answer"
            comps.append({"persona": p, "question_id": f"q{i}", "sample_index": 0, "text": text,
                          "n_new_tokens": n_tok, "finish_reason": "stop"})
    return comps


def record(cell: Cell, source_rate, leak_rate, n_tok=30):
    return {
        "cell": {"lr": cell.lr, "epochs": cell.epochs, "key": cell.key},
        "marker_rates": marker_rates_report(completions(source_rate, leak_rate, n_tok=n_tok), "villain", TINY),
        "arc": {"acc": 0.5, "acc_norm": 0.25, "n": 4, "predictions": []},
        "train": {"steps": 10, "tokens": 2000, "wall_seconds": 4.0, "final_loss": 0.12, "loss_curve": [1, 0.5]},
        "artifacts": {"adapter": f"sweeps/x/{cell.key}/adapter"},
    }


def some_records():
    cells = SWEEP.cells()
    return {
        cells[0].key: record(cells[0], 0.0, 0.0),
        cells[6].key: record(cells[6], 0.9, 0.0),
        cells[12].key: record(cells[12], 1.0, 1.0),
        cells[24].key: record(cells[24], 1.0, 1.0, n_tok=2),  # degenerate
    }


def test_compile_lists_missing_cells_and_invents_none():
    recs = some_records()
    given_missing = [SWEEP.cells()[1].key]
    out = compile_results(SWEEP, recs, given_missing)
    assert out["n_cells"] == 25 and out["n_complete"] == 4
    assert set(out["cells"]) == set(recs)
    # every grid cell without a record is missing, including those the caller forgot to list
    assert len(out["missing_cells"]) == 21 and set(out["missing_cells"]).isdisjoint(recs)
    assert given_missing[0] in out["missing_cells"]
    c = out["cells"][SWEEP.cells()[6].key]
    assert c["regime"] == "selective" and c["headline"]["source_adoption"] == 0.9
    assert c["arc"] == {"acc": 0.5, "acc_norm": 0.25, "n": 4}
    assert c["train"] == {"steps": 10, "tokens": 2000, "wall_seconds": 4.0, "tokens_per_s": 500.0,
                          "final_loss": 0.12, "supervised_tokens": None, "gpu_seconds": None, "first_loss": None,
                          "data_hash": None}  # fields the record did not give stay None, never invented
    assert c["personas"]["villain"]["k"] == 9 and "ci_low" in c["personas"]["villain"]
    assert out["cells"][SWEEP.cells()[24].key]["regime"] == "degenerate"
    assert out["sweep_config_hash"] == SWEEP.config_hash()
    assert out["grid"] == {"learning_rates": sorted(TINY.learning_rates), "epochs": sorted(TINY.epochs)}
    json.dumps(out)  # JSON-able


def test_compile_rejects_inconsistent_input():
    recs = some_records()
    with pytest.raises(ValueError, match="not cells of sweep"):
        compile_results(SWEEP, recs, ["lr=0.5_ep=1"])
    key = next(iter(recs))
    with pytest.raises(ValueError, match="also listed as missing"):
        compile_results(SWEEP, recs, [key])
    wrong = dict(recs)
    wrong[key] = {**recs[key], "cell": {**recs[key]["cell"], "epochs": 99}}
    with pytest.raises(ValueError, match="describes a different cell"):
        compile_results(SWEEP, wrong, [])


def test_heatmap_three_panels_png_pdf(tmp_path):
    compiled = compile_results(SWEEP, some_records(), [])
    fig, axes = build_heatmap_figure(compiled)
    assert len(axes) == 3 == len(HEADLINE_PANELS)
    assert [ax.get_title() for ax in axes] == ["Source adoption (villain)", "Assistant leakage",
                                               "Max bystander leakage"]
    texts = [t.get_text() for t in axes[0].texts]
    assert texts.count("n/a") == 21 and "90%" in texts and "100%\ndeg" in texts
    assert [t.get_text() for t in axes[0].get_yticklabels()] == [f"{lr:g}" for lr in sorted(TINY.learning_rates)]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == [str(e) for e in sorted(TINY.epochs)]
    paths = plot_heatmap(compiled, tmp_path / "out" / "heatmap.png", tmp_path / "out" / "heatmap.pdf")
    png, pdf = (open(p, "rb").read() for p in paths)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert pdf.startswith(b"%PDF") and len(pdf) > 1000
