#!/usr/bin/env bash
# Fresh machine or not: set up (idempotent), then the whole test suite: unit, tiny-model integration, Dagster
# materialize, end-to-end on loopback. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export ZLT_CHECKOV="$PWD/.venv-checkov/bin/checkov"
exec python -m pytest -q -ra --durations=25 "$@"  # the slowest tests listed: what to trim when CI nears 20 min
