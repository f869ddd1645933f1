"""Asset jobs: the units a user (or the sensor) launches, built from the asset objects (assets.py's lists).
Partitioning is inferred from the selected assets.

Runs of GPU jobs carry the tag zlt/gpu=true, which the production instance's run queue limits
(dagster_prod/dagster.yaml); every GPU step also carries the `zlt-gpu` concurrency pool (k8s_tags.py), which
applies to UI backfills too."""
from __future__ import annotations

from dagster import AssetSelection, define_asset_job

from .assets import CELL_ASSETS, REPORT_ASSETS, SWEEP_DATA_ASSETS
from .registry import CELL_JOB, DATA_JOB, REPORT_JOB

GPU_RUN_TAGS = {"zlt/gpu": "true"}

# per sweep: on-policy data + base-model ARC; later, compile + heatmap
sweep_data_job = define_asset_job(DATA_JOB, AssetSelection.assets(*SWEEP_DATA_ASSETS), tags=GPU_RUN_TAGS)
# per cell: train, generate, score (one partition = one run)
cell_job = define_asset_job(CELL_JOB, AssetSelection.assets(*CELL_ASSETS), tags=GPU_RUN_TAGS)
report_job = define_asset_job(REPORT_JOB, AssetSelection.assets(*REPORT_ASSETS))

ALL_JOBS = [sweep_data_job, cell_job, report_job]
