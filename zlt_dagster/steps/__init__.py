"""One function per asset: read inputs from the store, call the core, commit outputs, return a summary.

No Dagster here: the asset layer (zlt_dagster/defs) maps partitions to (sweep, cell), calls these and turns the
summary into materialization metadata (the summary's keys are the metadata names); the CLI, tests and benchmarks
can call them the same way. Every output is committed through the store's manifest (written last), so a crash
never leaves an artifact that looks complete. Where things are: layout.py (every store key), sweeps.py (register,
load, THE cell_done), one module per asset, checkpoints.py (a cell's checkpoints in the store), common.py.
"""
from .adapter import fetch_adapter, run_adapter, run_adapters
from .arc import load_arc_questions, run_arc, run_base_arc
from .common import ComputeSettings, StepError
from .compare import run_comparison
from .completions import load_completions, run_completions
from .marker_rates import run_marker_rates
from .onpolicy import load_onpolicy, run_onpolicy
from .report import run_compile, run_heatmap
from .sweeps import (
    DONE_ARTIFACTS, as_stored, cell_done, cell_problem, cells_done, is_missing, load_sweep, register_sweep,
)

__all__ = ["ComputeSettings", "DONE_ARTIFACTS", "StepError", "as_stored", "cell_done", "cell_problem", "cells_done",
           "fetch_adapter", "is_missing", "load_arc_questions", "load_completions", "load_onpolicy", "load_sweep",
           "register_sweep", "run_adapter", "run_adapters", "run_arc", "run_base_arc", "run_comparison",
           "run_compile", "run_completions", "run_heatmap", "run_marker_rates", "run_onpolicy"]
