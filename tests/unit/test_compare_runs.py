"""scripts/compare_runs.py: two eval reports compared query by query, and the reports it refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from training.evaluate import evaluate_embeddings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "compare_runs.py"


def report(tmp: Path, name: str, noise: float, queries: int = 40, seed: int = 0) -> Path:
    """An eval report like `uembed evaluate` writes, from clustered toy embeddings."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(10, 32))
    gl = list(np.repeat(np.arange(10), 3))
    ql = list(rng.integers(0, 10, queries))
    noisy = np.random.default_rng(seed + 1)
    g = centers[gl] + noise * noisy.normal(size=(30, 32))
    q = centers[ql] + noise * noisy.normal(size=(queries, 32))
    res = evaluate_embeddings(q, ql, g, gl)
    res["label_key"], res["gallery_size"] = "identity", 30
    path = tmp / name / "eval.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"checkpoint": name, "results": {"toy": res}}))
    return path


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_rows_are_paired_differences(tmp_path: Path) -> None:
    good, bad = report(tmp_path, "good", 0.6), report(tmp_path, "bad", 2.5)
    out = run(good.parent, bad)  # a run directory and a report file
    assert out.returncode == 0, out.stderr
    rows = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| toy |")]
    assert [(r[1], r[2]) for r in rows] == [(k, m) for k in ("float", "binary") for m in ("p@1", "avg_p@20")]
    a = json.loads(good.read_text())["results"]["toy"]
    b = json.loads(bad.read_text())["results"]["toy"]
    for r in rows:
        kind, metric = r[1], r[2]
        assert float(r[3]) == round(100 * a[kind][metric], 1) and float(r[4]) == round(100 * b[kind][metric], 1)
        # Paired by position: the interval of the per-query differences, computed here from the reports.
        d = np.subtract(a[kind]["per_query"][metric], b[kind]["per_query"][metric], dtype=float)
        half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
        assert r[6] == f"{100 * (d.mean() - half):.1f} to {100 * (d.mean() + half):.1f}"
    p1 = rows[0]  # float P@1: the queries only A gets right minus those only B gets right = the gap
    diff = round(100 * (a["float"]["p@1"] - b["float"]["p@1"]) * 40 / 100)
    assert int(p1[7]) - int(p1[8].rstrip(" |")) == diff and diff > 0


def test_reports_that_cannot_be_paired_are_refused(tmp_path: Path) -> None:
    a = report(tmp_path, "a", 1.0)
    fewer = report(tmp_path, "fewer", 1.0, queries=30)
    out = run(a, fewer)
    assert out.returncode == 1 and "40 and 30 queries cannot be paired" in out.stderr
    old = json.loads(a.read_text())
    for kind in ("float", "binary"):
        del old["results"]["toy"][kind]["per_query"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    out = run(a, tmp_path / "old.json")
    assert out.returncode == 1 and "no per-query results" in out.stderr
    out = run(a, tmp_path / "missing")
    assert out.returncode != 0 and "no eval report" in out.stderr
    (tmp_path / "other.json").write_text(json.dumps({"queries": 3}))
    out = run(a, tmp_path / "other.json")
    assert out.returncode != 0 and "not an eval report" in out.stderr
    bigger = json.loads(a.read_text())
    bigger["results"]["toy"]["gallery_size"] = 31
    (tmp_path / "bigger.json").write_text(json.dumps(bigger))
    out = run(a, tmp_path / "bigger.json")
    assert out.returncode == 1 and "gallery_size differs (30 and 31)" in out.stderr
