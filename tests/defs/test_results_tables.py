"""scripts/results_tables.py, the tables RESULTS.md quotes, on an exported sweep (results/)."""
from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SEED_GRID = ROOT / "results" / "smollm2-135m-villain"


def _tables():
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "scripts" / "results_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tables


def test_gpu_seconds_rows_count_the_cells_that_have_the_record(tmp_path):
    tables = _tables()
    text = tables(SEED_GRID)
    assert "| completions (25 cells) | 129.8 |" in text and "| arc_scores (25 cells) | 76.6 |" in text
    part = tmp_path / "part"
    shutil.copytree(SEED_GRID, part)
    (part / "cells" / "lr=1e-06_ep=1" / "completions_stats.json").unlink()  # an export without some records
    (part / "cells" / "lr=1e-06_ep=3" / "arc_scores.json").unlink()
    text = tables(part)
    assert re.search(r"\| completions \(24 cells\) \| [\d.]+ \|", text), text
    assert re.search(r"\| arc_scores \(24 cells\) \| [\d.]+ \|", text), text
