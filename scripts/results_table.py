"""Print the ablation table of docs/results.md from the eval.json of each run of scripts/ablation.sh.

    python scripts/results_table.py runs/ablation pixels untrained identity subcategory keywords unified

One row per model and code type; the columns are each evaluation set's headline metrics:
browse Avg P@20 (relevant = same subcategory), camera P@1 and Avg P@20, scene P@1 (same identity).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [("browse", "avg_p@20"), ("browse", "map@r"), ("camera", "p@1"), ("camera", "avg_p@20"),
           ("scene", "p@1"), ("scene", "map@r")]


def table(root: Path, rows: list[str]) -> str:
    head = "| model | codes | " + " | ".join(f"{s} {m}" for s, m in COLUMNS) + " |"
    lines = [head, "|---|---|" + "---|" * len(COLUMNS)]
    for row in rows:
        results = json.loads((root / row / "eval.json").read_text())["results"]
        for kind in ("float", "binary"):
            cells = " | ".join(f"{100 * results[s][kind][m]:.1f}" for s, m in COLUMNS)
            lines.append(f"| {row} | {kind} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(Path(sys.argv[1]), sys.argv[2:]), end="")
