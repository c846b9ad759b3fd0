"""Shared fixtures: a tiny synthetic dataset (real encoded images) and a tiny training config."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tqdm

from training.config import SyntheticDataConfig, TrainConfig, config_from_dict
from training.data.synthetic import generate_synthetic

# No tqdm monitor thread in the test process, whoever creates the first bar: a thread that wakes for
# the GIL while a data loader forks its workers left a worker waiting for the GIL forever (CI hangs in
# test_resume_continues_bit_for_bit with the monitor thread alive in the pytest process).
tqdm.tqdm.monitor_interval = 0

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str, name: str) -> ModuleType:
    """A script of the repository that is not in a package (scripts/, bench/) imported as module `name`."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 identities (6 held out) x 4 views at 32 px, plus a second manifest that only carries
    attribute labels, so batches mix two datasets and tasks see unlabeled images."""
    out = tmp_path_factory.mktemp("synth")
    paths = generate_synthetic(SyntheticDataConfig(out=str(out), identities=24, holdout=6, views=4,
                                                   image_size=32, categories=4, seed=1))
    lines = paths["train"].read_text().splitlines()
    extra = []
    for line in lines[: len(lines) // 2]:
        row = json.loads(line)
        extra.append(json.dumps({"image": row["image"], "labels": {"attributes": row["labels"]["attributes"]}}))
    (out / "attributes_only.jsonl").write_text("\n".join(extra) + "\n")
    return out


def tiny_config_dict(data: Path) -> dict[str, Any]:
    train = str(data / "train.jsonl")
    extra = str(data / "attributes_only.jsonl")
    return {
        "name": "tiny",
        "seed": 3,
        "model": {"trunk": "test_resnet", "embedding_dim": 32},
        "preprocess": {"input_size": 32},
        "data": {"images_per_dataset": 8, "num_workers": 0, "augment": "light",
                 "datasets": [{"manifest": train, "m_per_class": 4, "class_key": "identity"}]},
        "tasks": [
            {"name": "identity", "manifest": train, "head": "norm_softmax", "num_sampled": 6},
            {"name": "category", "manifest": train, "head": "arcface", "margin": 0.2, "scale": 16.0},
            {"name": "attributes", "manifest": [train, extra], "head": "multilabel_softmax"},
            {"name": "pairs", "manifest": train, "head": "double_margin", "label_key": "identity", "weight": 0.5},
        ],
        "optim": {"optimizer": "sgd", "lr": 0.05, "proxy_lr": 1.0},
        "train": {"epochs": 2, "log_every": 1, "progress": False, "device": "cpu"},
        "eval": [{"name": "heldout", "query": str(data / "query.jsonl"), "gallery": str(data / "gallery.jsonl"),
                  "label_key": "identity"}],
    }


@pytest.fixture
def tiny_config(synth_dir: Path) -> dict[str, Any]:
    return copy.deepcopy(tiny_config_dict(synth_dir))


def build_config(raw: dict[str, Any], *overrides: str) -> TrainConfig:
    return config_from_dict(copy.deepcopy(raw), list(overrides))


@pytest.fixture(scope="session")
def tiny_checkpoint(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with a 3-step checkpoint of the tiny config."""
    from training.train import Trainer

    raw = tiny_config_dict(synth_dir)
    raw["train"]["max_steps"] = 3
    run = tmp_path_factory.mktemp("tiny_run")
    Trainer(config_from_dict(raw), run).fit()
    return run


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported to TorchScript and ONNX (parity checked by the export)."""
    from model_export.export import ExportOptions, export_checkpoint

    out = tmp_path_factory.mktemp("artifact")
    export_checkpoint(tiny_checkpoint, out, ExportOptions(formats=["torchscript", "onnx"], onnx_simplify="off"),
                      log=lambda _: None)
    return out
