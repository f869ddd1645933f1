#!/usr/bin/env bash
# Reproduce docs/screenshots/*.png at 100% zoom, 1600 x 1000: runs the UI end-to-end test (dagster dev on
# 127.0.0.1, tiny protocol, headless Chromium; ~1 min on 2 cores) with ZLT_E2E_SCREENSHOTS set, so its views
# are written here: launch_one_partition, cell_figure, heatmap_asset, adapter_partitions, asset_graph,
# sensor_tick_failed. Needs Debian's chromium (scripts/setup.sh installs it as root; else apt-get install chromium).
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v chromium >/dev/null || { echo "take.sh needs Debian's chromium (apt-get install -y chromium)" >&2; exit 1; }
. .venv/bin/activate
ZLT_E2E_SCREENSHOTS="$PWD/docs/screenshots" exec python -m pytest -q -s -m e2e tests/e2e/test_ui_browser.py "$@"
