#!/usr/bin/env bash
# Reproduce docs/screenshots/*.png. Runs the end-to-end user-flows test (dagster dev on 127.0.0.1, tiny protocol,
# a 25-cell backfill and a sensor-scheduled second persona; ~7 min on 2 cores) with ZLT_E2E_SCREENSHOTS set: once
# the flows pass, with the webserver still up, docs/screenshots/take.py points headless Chromium at the asset
# graph, the partitions view of `adapter` and the `heatmap` asset (figure opened).
# To shoot an instance you already run instead: python docs/screenshots/take.py http://127.0.0.1:3000 <sweep id> docs/screenshots
# Needs Debian's chromium: apt-get update && apt-get install -y chromium
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v chromium >/dev/null || { echo "take.sh needs Debian's chromium (apt-get install -y chromium)" >&2; exit 1; }
. .venv/bin/activate
ZLT_E2E_SCREENSHOTS="$PWD/docs/screenshots" exec python -m pytest -q -s -m e2e tests/e2e/test_user_flows.py "$@"
