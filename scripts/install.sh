#!/usr/bin/env bash
# Creates .venv (if missing) and installs uembed with the dev extra.
# torch/torchvision go through pip first, pinned: on the project's machines pip takes them from local disk.
# Everything else installs at the versions in constraints.txt (scripts/lock.sh writes it), so a fresh
# machine gets what the suite last passed with; UEMBED_UNLOCKED=1 takes the newest releases instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
LOCK=(-c constraints.txt)
if [ "${UEMBED_UNLOCKED:-0}" = 1 ]; then LOCK=(); fi
.venv/bin/python -m pip install --quiet "${LOCK[@]}" -e ".[${UEMBED_EXTRAS:-dev}]"
echo "uembed installed in $(pwd)/.venv"
