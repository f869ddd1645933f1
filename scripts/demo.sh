#!/usr/bin/env bash
# Fresh machine or not: set up (idempotent), then the demo sweep on the embedded default (SmolLM2-135M, demo
# protocol, 25 cells, local artifacts under .zlt/artifacts, Dagster instance under .dagster_home).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec zlt demo "$@"
