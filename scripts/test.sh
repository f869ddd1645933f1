#!/usr/bin/env bash
# The whole test suite: unit, tiny-model integration, Dagster materialize, end-to-end on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
exec python -m pytest -q -ra "$@"
