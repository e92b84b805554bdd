#!/usr/bin/env bash
# Create .venv with the pinned dependencies and assemble the model pack. Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -r "${REQUIREMENTS:-requirements.txt}"
.venv/bin/python -m modelpack pull "${ZHIWEN_MODEL_PACK:-demo}"
