#!/usr/bin/env bash
# The paper's ablation on the emoji data (docs/results.md): single-task models vs the unified one,
# plus the pixel and untrained baselines, all on the eval sets of CONFIG, float and binary.
# Every model trains with the same configs, schedule and seed; only the task list differs. The
# shipped recipe (v11) is one stage, CONFIG straight into OUT/NAME; with FINETUNE set, each model
# trains in two stages: CONFIG into OUT/stage1/NAME, then FINETUNE from those weights into OUT/NAME.
#   bash scripts/ablation.sh            # four models (time per run: docs/results.md)
#   CONFIG=configs/v10_stage1.yaml FINETUNE=configs/v10_finetune.yaml OUT=runs/v10 bash scripts/ablation.sh
# Needs the pretrained trunk for the default config: .venv/bin/uembed data trunk
# Needs the data first: .venv/bin/uembed data emoji --out data/emoji
# An interrupted run resumes from its last checkpoint when the script is started again.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/default.yaml}
FINETUNE=${FINETUNE:-}
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
