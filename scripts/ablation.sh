#!/usr/bin/env bash
# The paper's ablation on the emoji data (docs/results.md): single-task models vs the unified one,
# plus the pixel and untrained baselines, all on the eval sets of CONFIG, float and binary.
# Every model trains with the same configs, schedule and seed; only the task list differs. Each
# model trains in two stages like the shipped one: CONFIG into OUT/stage1/NAME, then FINETUNE from
# those weights into OUT/NAME (FINETUNE= empty: one stage, straight into OUT/NAME).
#   bash scripts/ablation.sh            # four models (time per run: docs/results.md)
# Needs the data first: .venv/bin/uembed data emoji --out data/emoji
# An interrupted run resumes from its last checkpoint when the script is started again.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/default.yaml}
FINETUNE=${FINETUNE-configs/default_finetune.yaml}
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
  if [ -n "$FINETUNE" ]; then
    "$UEMBED" train --config "$CONFIG" --out "$OUT/stage1/$tasks" "${only[@]}" train.progress=false
    "$UEMBED" train --config "$FINETUNE" --out "$OUT/$tasks" "${only[@]}" train.init_from="$OUT/stage1/$tasks" \
      train.progress=false
  else
    "$UEMBED" train --config "$CONFIG" --out "$OUT/$tasks" "${only[@]}" train.progress=false
  fi
  "$UEMBED" evaluate --run "$OUT/$tasks" > /dev/null
done
.venv/bin/python scripts/results_table.py "$OUT" pixels untrained identity subcategory keywords unified
# The unified model against each single-task model, query by query (paired 95% intervals).
for single in identity subcategory keywords; do
  .venv/bin/python scripts/compare_runs.py "$OUT/unified" "$OUT/$single"
done
