"""Asset jobs: the units a user (or the sensor) launches."""
from __future__ import annotations

from dagster import AssetSelection, define_asset_job

from .partitions import sweep_cell_partitions, sweep_partitions

# per sweep: on-policy data + base-model ARC; later, compile + heatmap
sweep_data_job = define_asset_job("sweep_data_job", AssetSelection.assets("onpolicy_data", "base_arc_scores"),
                                  partitions_def=sweep_partitions)
# per cell: train, generate, score (one partition = one run)
cell_job = define_asset_job("cell_job", AssetSelection.assets("adapter", "completions", "marker_rates",
                                                              "arc_scores"), partitions_def=sweep_cell_partitions)
report_job = define_asset_job("report_job", AssetSelection.assets("compiled_results", "heatmap"),
                              partitions_def=sweep_partitions)

ALL_JOBS = [sweep_data_job, cell_job, report_job]
