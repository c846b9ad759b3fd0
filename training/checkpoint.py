"""Checkpoint layout, one directory per saved step:

    RUN_DIR/checkpoints/step_00001200/
        model.safetensors     embedding model weights (what export reads)
        proxies.safetensors   one tensor per proxy task (the class proxies, M x D)
        config.json           the resolved training config
        classes.json          class names per task, index = proxy row
        trainer_state.pt      optimizer/scaler state and counters; only tensors and plain
                              containers, loaded with torch.load(weights_only=True)
        code_rotation.json    only after a code rotation (training/code_rotation.py): what it did
    RUN_DIR/checkpoints/LATEST   name of the newest complete checkpoint

A checkpoint is written to a temporary directory and renamed, so a crash never leaves a half
checkpoint behind LATEST.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from training.config import TrainConfig, config_from_dict
from training.model import UnifiedEmbeddingModel
from uembed.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A missing or unreadable checkpoint."""


def save_checkpoint(run_dir: Path, step: int, *, model_state: dict[str, torch.Tensor],
                    proxies: dict[str, torch.Tensor], cfg: TrainConfig, classes: dict[str, list[str]],
                    trainer_state: dict[str, Any], keep: int = 2,
                    notes: dict[str, dict[str, Any]] | None = None) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors",
              metadata={"format": "pt", "step": str(step)})
    save_file({k: v.detach().cpu().contiguous() for k, v in proxies.items()}, tmp / "proxies.safetensors")
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (tmp / "classes.json").write_text(json.dumps(classes, ensure_ascii=False))
    torch.save(trainer_state, tmp / "trainer_state.pt")
    for file, note in (notes or {}).items():  # records of what was done to these weights (JSON)
        (tmp / file).write_text(json.dumps(note, indent=2))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / "LATEST.tmp").write_text(name)
    (root / "LATEST.tmp").rename(root / "LATEST")
    existing = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in existing[: max(0, len(existing) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    marker = root / "LATEST"
    if marker.exists():
        path = root / marker.read_text().strip()
        if path.is_dir():
            return path
    found = sorted(p for p in root.glob("step_*") if p.is_dir())
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory (its newest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in {path} (expected model.safetensors or checkpoints/)")
    return ckpt


def load_checkpoint_config(ckpt: Path) -> TrainConfig:
    return config_from_dict(json.loads((ckpt / "config.json").read_text()))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[UnifiedEmbeddingModel, TrainConfig]:
    """The embedding model of a checkpoint (or a run's newest), in eval mode."""
    ckpt = resolve_checkpoint(path)
    cfg = load_checkpoint_config(ckpt)
    model_cfg = cfg.model
    model_cfg.pretrained = False  # the checkpoint has the weights; never fetch from a hub here
    model = UnifiedEmbeddingModel(model_cfg)
    state = load_file(ckpt / "model.safetensors")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)


def load_proxies(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "proxies.safetensors")


def load_classes(ckpt: Path) -> dict[str, list[str]]:
    return json.loads((ckpt / "classes.json").read_text())
