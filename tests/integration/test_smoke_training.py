"""The README's first command, for real: `uembed train` on the smoke config, then `uembed evaluate`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.config import load_config
from training.evaluate import evaluate_sets
from training.model import UnifiedEmbeddingModel

ROOT = Path(__file__).resolve().parents[2]
UEMBED = [sys.executable, "-m", "uembed.cli"]


@pytest.mark.slow
def test_smoke_training_learns_far_above_chance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the config's data paths are relative to the working directory
    shutil.copy(ROOT / "configs" / "smoke.yaml", tmp_path / "smoke.yaml")
    train = subprocess.run([*UEMBED, "train", "--config", "smoke.yaml", "--out", "runs/smoke",
                            "train.progress=false"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads(train.stdout.strip().splitlines()[-1])
    assert summary["event"] == "end" and summary["step"] > 0

    ev = subprocess.run([*UEMBED, "evaluate", "--run", "runs/smoke"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "| heldout_identity | float |" in ev.stdout
    report = json.loads((tmp_path / "runs/smoke/eval.json").read_text())
    identity = report["results"]["heldout_identity"]
    chance = 1 / identity["float"]["queries"]  # one query per held-out identity, same views each
    trained_float, trained_binary = identity["float"]["p@1"], identity["binary"]["p@1"]

    # The same network untrained, on the same camera-like queries.
    cfg = load_config(tmp_path / "smoke.yaml")
    torch.manual_seed(0)
    untrained = evaluate_sets(UnifiedEmbeddingModel(cfg.model).eval(), cfg.eval[:1], cfg.preprocess_spec)
    untrained_float = untrained["heldout_identity"]["float"]["p@1"]

    assert trained_float >= 10 * chance and trained_binary >= 8 * chance, (trained_float, trained_binary, chance)
    assert trained_float >= untrained_float + 0.25, (trained_float, untrained_float)


def test_cli_errors_are_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [{name: x, manifest: m.jsonl, head: softmax}]\n")
    out = subprocess.run([*UEMBED, "train", "--config", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "uembed train: error:" in out.stderr and "softmax" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([*UEMBED, "evaluate", "--run", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no checkpoint" in out.stderr
