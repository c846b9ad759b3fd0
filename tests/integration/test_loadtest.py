"""The Locust load test against a real `uembed serve` on 127.0.0.1 with the shipped default model:
a bounded headless smoke (about 20 s, step shape) that must pass its SLO gate, and a short run whose
gate must fail. Locust runs as its own process (it monkey-patches the standard library)."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service_helpers import serve_process

ROOT = Path(__file__).resolve().parents[2]
MODEL = str(ROOT / "models" / "default")


def locust(url: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
    exe = shutil.which("locust") or str(Path(sys.executable).parent / "locust")
    return subprocess.run(
        [exe, "-f", str(ROOT / "loadtest" / "locustfile.py"), "--config", str(ROOT / "loadtest" / "locust.conf"),
         "--host", url, "--csv", str(out / "run"), "--html", str(out / "run.html"), *flags],
        capture_output=True, text=True, timeout=180, cwd=ROOT)


def stats_rows(out: Path) -> dict[str, dict]:
    with (out / "run_stats.csv").open() as f:
        return {f"{r['Type']} {r['Name']}": r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_locust_smoke_passes_its_slo_gate(tmp_path: Path) -> None:
    with serve_process(MODEL, "--log-level", "warning") as url:
        run = locust(url, tmp_path, "--users", "8", "--spawn-rate", "8", "--step-users", "4", "--step-seconds", "8",
                     "--run-time", "20s", "--slo-p95-ms", "2000", "--slo-p99-ms", "4000")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "SLO gate" in out and "passed" in out, out[-4000:]
    rows = stats_rows(tmp_path)
    embed = {k: r for k, r in rows.items() if k.startswith("POST /embed")}
    # Raw and multipart bodies, float / binary / both: every kind was sent, checked, and none failed.
    assert {k.split()[2] for k in embed} == {"raw", "multipart"}
    assert {k.split()[3] for k in embed} == {"float", "binary", "both"}
    assert sum(int(r["Request Count"]) for r in embed.values()) >= 50
    assert all(int(r["Failure Count"]) == 0 for r in embed.values())
    # The server's own times, from the response headers.
    assert int(rows["SERVER inference"]["Request Count"]) > 0 and int(rows["SERVER queue wait"]["Request Count"]) > 0
    assert (tmp_path / "run.html").stat().st_size > 10_000


@pytest.mark.slow
def test_slo_gate_fails_on_failures_and_latency(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(ROOT / "loadtest" / "photos" / "brick_160x160.jpg", photos)
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with serve_process(MODEL, "--log-level", "warning") as url:
        run = locust(url, tmp_path, "--users", "2", "--spawn-rate", "2", "--step-users", "0", "--run-time", "4s",
                     "--photos", str(photos), "--slo-p95-ms", "0.001", "--multipart-max", "1")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-4000:]
    assert "FAILED" in out and "failure ratio" in out and "p95" in out, out[-4000:]
    failures = (tmp_path / "run_failures.csv").read_text()
    assert "HTTP 400" in failures
