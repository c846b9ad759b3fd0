#!/usr/bin/env bash
# The paper's ablation on the emoji data (docs/results.md): single-task models vs the unified one,
# plus the pixel and untrained baselines, all on the eval sets of CONFIG, float and binary.
# Every model trains with the same config, schedule and seed; only the task list differs.
#   bash scripts/ablation.sh            # four trainings (time per run: docs/results.md)
# Needs the data first: .venv/bin/uembed data emoji --out data/emoji
# An interrupted run resumes from its last checkpoint when the script is started again.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/default.yaml}
OUT=${OUT:-runs/ablation}
UEMBED=${UEMBED:-.venv/bin/uembed}
mkdir -p "$OUT"

"$UEMBED" evaluate --config "$CONFIG" --baseline pixels --out "$OUT/pixels/eval.json"
"$UEMBED" evaluate --config "$CONFIG" --baseline untrained --out "$OUT/untrained/eval.json"
for tasks in unified identity subcategory keywords; do
  only=()
  case "$tasks" in
    unified) ;;
    identity)  # the identity task's proxy loss, and its pair loss when the config has one
      only=(--only-tasks identity)
      if grep -q "name: pairs" "$CONFIG"; then only=(--only-tasks identity,pairs); fi ;;
    *) only=(--only-tasks "$tasks") ;;
  esac
  "$UEMBED" train --config "$CONFIG" --out "$OUT/$tasks" "${only[@]}" train.progress=false
  "$UEMBED" evaluate --run "$OUT/$tasks" > /dev/null
done
.venv/bin/python scripts/results_table.py "$OUT" pixels untrained identity subcategory keywords unified
