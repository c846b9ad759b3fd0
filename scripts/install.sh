#!/usr/bin/env bash
# Creates .venv (if missing) and installs uembed with the dev extra.
# torch/torchvision go through pip first, pinned: on the project's machines pip takes them from local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[${UEMBED_EXTRAS:-dev}]"
echo "uembed installed in $(pwd)/.venv"
