"""Compare two evaluated runs query by query: what B gives up against A on each set's headline metrics.

    python scripts/compare_runs.py runs/v10/unified runs/v10/identity
    python scripts/compare_runs.py runs/v10/unified/eval.json runs/v10/pixels/eval.json

Each argument is a run directory (its eval.json) or an eval report (`uembed evaluate` output). Both
must come from the same eval sets: the per-query results are paired by position, so the sets, their
query counts, gallery sizes and label keys have to match. Rows: set, codes, metric, A, B, A - B in points with
a 95% interval of the paired difference, and for P@1 how many queries only A or only B gets right at
rank 1 (training.evaluate.paired_loss). Reports written before per-query results were kept
(2026-11-23) have none: evaluate the run again (`uembed evaluate --run RUN`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.evaluate import PAIRED_METRICS, paired_loss


def load_results(path: str | Path) -> dict[str, dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "eval.json"
    if not p.is_file():
        raise SystemExit(f"{path}: no eval report (run `uembed evaluate --run {path}` first)")
    try:
        return json.loads(p.read_text())["results"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise SystemExit(f"{p}: not an eval report (a JSON object with 'results')") from None


def compare(a: dict[str, dict], b: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per set, code type and metric; raises ValueError when the two reports cannot be paired."""
    if sorted(a) != sorted(b):
        raise ValueError(f"the reports evaluate different sets: {sorted(a)} and {sorted(b)}")
    rows = []
    for name in a:
        for key in ("label_key", "gallery_size"):
            if a[name].get(key) != b[name].get(key):
                raise ValueError(f"{name}: {key} differs ({a[name].get(key)} and {b[name].get(key)})")
        for kind in ("float", "binary"):
            ra, rb = a[name][kind], b[name][kind]
            if "per_query" not in ra or "per_query" not in rb:
                raise ValueError(f"{name} {kind}: a report has no per-query results; evaluate that run again")
            if ra["queries"] != rb["queries"]:
                raise ValueError(f"{name}: {ra['queries']} and {rb['queries']} queries cannot be paired")
            for metric in PAIRED_METRICS:
                va, vb = np.asarray(ra["per_query"][metric]), np.asarray(rb["per_query"][metric])
                if metric == "p@1":
                    va, vb = va.astype(bool), vb.astype(bool)
                paired = paired_loss(va, vb, ("a", "b"))
                rows.append({"set": name, "codes": kind, "metric": metric, "a": ra[metric], "b": rb[metric], **paired})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| set | codes | metric | A | B | A - B | 95% interval | A only | B only |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ci95"]
        only = f"{r['a_only']} | {r['b_only']}" if "a_only" in r else " | "
        lines.append(f"| {r['set']} | {r['codes']} | {r['metric']} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | "
                     f"{100 * r['loss']:.1f} | {100 * lo:.1f} to {100 * hi:.1f} | {only} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        rows = compare(load_results(argv[0]), load_results(argv[1]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"A = {argv[0]}, B = {argv[1]}")
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
