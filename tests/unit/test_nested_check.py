"""scripts/nested_check.py on the synthetic set: the split holds whole identities out of the proxy's
config, and the check measures float and binary on them before and after the code rotation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import build_config, load_script
from training.config import load_config, save_config
from training.data.manifest import read_manifest

nested_check = load_script("scripts/nested_check.py", "nested_check")


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *argv: str) -> list[dict]:
    monkeypatch.setattr(sys, "argv", ["nested_check.py", *argv])
    nested_check.main()
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_split_then_check(tiny_config: dict, tiny_checkpoint: Path, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "config.yaml"
    save_config(build_config(tiny_config, "code_rotation.steps=5", "code_rotation.queries_per_step=16"), config)
    out = tmp_path / "nested"
    [summary] = _run(monkeypatch, capsys, "split", "--config", str(config), "--out", str(out), "--fraction", "0.34")
    train, val = read_manifest(out / "train.jsonl"), read_manifest(out / "val.jsonl")
    held = {r.labels["identity"] for r in val}
    assert summary["held_out"] == len(held) == round(0.34 * summary["values"]) > 0
    assert not held & {r.labels["identity"] for r in train}
    assert len(train) + len(val) == len(read_manifest(tiny_config["data"]["datasets"][0]["manifest"]))
    assert all(r.image.is_file() for r in train + val)
    proxy = load_config(out / "config.yaml")
    assert proxy.data.datasets[0].manifest == str(out / "train.jsonl") and proxy.code_rotation.steps == 0
    assert proxy.eval == []  # the proxy is never measured on the real eval identities
    assert str(out / "train.jsonl") in proxy.tasks[0].manifest

    # The check itself (here on a model that saw every identity: the plumbing, not the estimate).
    before, after = _run(monkeypatch, capsys, "check", "--run", str(tiny_checkpoint), "--config", str(config),
                         "--val", str(out / "val.jsonl"), "--work", str(tmp_path / "sets"), "--rounds", "2",
                         "--scenes", "5", "--browse-label", "category", "--workers", "0")
    assert before["rotation"] == "none" and after["rotation"]["settings"]["steps"] == 5
    assert before["browse"]["queries"] == before["camera"]["queries"] == 2 * len(held)
    assert before["scene"]["queries"] == 5
    for kind in ("browse", "camera", "scene"):
        # The rotation keeps every float cosine; the gap is float minus binary, in points.
        assert after[kind]["float_p@1"] == before[kind]["float_p@1"]
        for res in (before, after):
            r = res[kind]
            assert r["gap"] == pytest.approx(r["float_p@1"] - r["binary_p@1"], abs=0.02)
            assert r["gap_ci95"][0] <= r["gap"] <= r["gap_ci95"][1]
    assert (tmp_path / "sets" / "scene" / "eval" / "scene_query.jsonl").is_file()
