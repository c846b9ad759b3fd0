"""The code rotation (training/code_rotation.py): a learned orthogonal R folded into the projection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import build_config
from training.checkpoint import CheckpointError, load_model, load_proxies, resolve_checkpoint
from training.code_rotation import (
    RECORD_FILE,
    ViewsDataset,
    _retrieval_report,
    embed_views,
    fit_rotation,
    rotate_run,
    rotate_state,
    rotation_record,
    view_names,
)
from training.config import CodeRotationConfig, ConfigError
from training.data.manifest import read_manifest


def _random_rotation(dim: int, seed: int) -> torch.Tensor:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return torch.tensor(q * np.sign(np.diag(r)), dtype=torch.float32)


def test_rotate_state_keeps_float_cosines_and_proxy_logits(tiny_checkpoint: Path) -> None:
    model, cfg = load_model(tiny_checkpoint)
    proxies = load_proxies(resolve_checkpoint(tiny_checkpoint))
    rotation = _random_rotation(cfg.model.embedding_dim, 0)
    state, rotated = rotate_state(model.state_dict(), proxies, rotation)
    turned, _ = load_model(tiny_checkpoint)
    turned.load_state_dict(state)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        e, f = model(images), turned(images)
    assert torch.allclose(f, e @ rotation, atol=1e-5)  # the new embedding is e R
    assert torch.allclose(f @ f.T, e @ e.T, atol=1e-5)  # every float cosine kept
    assert not torch.equal(f > 0, e > 0)  # and the bits changed
    for name, p in proxies.items():
        assert torch.allclose(f @ rotated[name].T, e @ p.T, atol=1e-4), name  # proxy logits kept


def test_fit_rotation_is_orthogonal_and_frees_the_bits_of_a_shared_direction() -> None:
    # 30 classes whose embeddings share a strong component along the all-ones diagonal: every
    # coordinate is positive for nearly every image, so the sign bits at R = I say almost nothing.
    # A rotation that moves the shared direction onto one axis frees the other bits for the classes.
    rng = np.random.default_rng(0)
    dim, classes, per = 16, 30, 4
    centers = rng.standard_normal((classes, dim))
    shared = np.ones(dim) / np.sqrt(dim) * 6.0
    x = shared + np.repeat(centers, per, axis=0)[:, None, :] + 0.35 * rng.standard_normal((classes * per, 3, dim))
    emb = torch.tensor(x / np.linalg.norm(x, axis=-1, keepdims=True), dtype=torch.float32)
    labels = torch.arange(classes).repeat_interleave(per)
    cfg = CodeRotationConfig(steps=150, lr=0.01, beta=20.0)
    rotation = fit_rotation(emb, labels, cfg, seed=0)
    assert torch.allclose(rotation @ rotation.T, torch.eye(dim), atol=1e-4)
    before, after = _retrieval_report(emb, labels, None), _retrieval_report(emb, labels, rotation)
    assert after["clean_float"] == before["clean_float"]  # float ranks do not move
    assert before["camera_binary"] < 40.0
    for view in ("clean", "camera", "scene"):
        assert after[f"{view}_binary"] > before[f"{view}_binary"] + 20.0, (before, after)
    assert torch.equal(rotation, fit_rotation(emb, labels, cfg, seed=0))  # deterministic


def test_fit_rotation_extra_labels_enter_the_loss() -> None:
    # Identities nest in 4 groups; the extra term is the groups. With it the fit must move and stay
    # orthogonal, the report must rank the groups (float unchanged by R), and an extra label that
    # no image carries (-1 everywhere) must leave the fit exactly as without it. (Whether the term
    # helps is a question for real data: docs/results.md, recipe v13.)
    rng = np.random.default_rng(1)
    dim, classes, per = 16, 24, 3
    groups = np.repeat(np.arange(4), classes // 4)
    centers = 2.0 * rng.standard_normal((4, dim))[groups] + rng.standard_normal((classes, dim))
    x = 5.0 * np.ones(dim) / np.sqrt(dim) + np.repeat(centers, per, axis=0)[:, None, :] \
        + 0.5 * rng.standard_normal((classes * per, 5, dim))
    emb = torch.tensor(x / np.linalg.norm(x, axis=-1, keepdims=True), dtype=torch.float32)
    labels = torch.arange(classes).repeat_interleave(per)
    group = torch.from_numpy(groups).repeat_interleave(per)
    cfg = CodeRotationConfig(steps=60, lr=0.01, beta=20.0)
    alone = fit_rotation(emb, labels, cfg, seed=0)
    both = fit_rotation(emb, labels, cfg, seed=0, extra=[(group, 1.0)])
    assert not torch.allclose(alone, both)
    assert torch.allclose(both @ both.T, torch.eye(dim), atol=1e-4)
    none = torch.full_like(labels, -1)
    assert torch.equal(alone, fit_rotation(emb, labels, cfg, seed=0, extra=[(none, 1.0)]))
    before = _retrieval_report(emb, labels, None, {"group": group})
    after = _retrieval_report(emb, labels, both, {"group": group})
    assert after["group_avg_p@20_float"] == before["group_avg_p@20_float"] > 50.0
    assert after["group_avg_p@20_binary"] != before["group_avg_p@20_binary"]


def test_fit_rotation_needs_classes_with_two_images() -> None:
    emb = torch.nn.functional.normalize(torch.randn(6, 3, 8), dim=-1)
    with pytest.raises(ConfigError, match="two or more images"):
        fit_rotation(emb, torch.arange(6), CodeRotationConfig(steps=2))


def test_views_are_seeded_and_distinct(synth_dir: Path) -> None:
    from uembed.preprocess import PreprocessSpec

    records = read_manifest(synth_dir / "train.jsonl")[:3]
    ds = ViewsDataset(records, PreprocessSpec(input_size=32), seed=5)
    a, b = ds[1], ds[1]
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    assert not torch.equal(ViewsDataset(records, PreprocessSpec(input_size=32), seed=6)[1][1], a[1])


def test_more_draws_add_views_and_keep_the_first(synth_dir: Path) -> None:
    from uembed.preprocess import PreprocessSpec

    records = read_manifest(synth_dir / "train.jsonl")[:3]
    spec = PreprocessSpec(input_size=32)
    one, three = ViewsDataset(records, spec, seed=5)[2], ViewsDataset(records, spec, seed=5, draws=3)[2]
    assert three.shape == (7, 3, 32, 32) and len(view_names(3)) == 7
    assert torch.equal(three[:3], one)  # the first draw does not depend on how many follow
    assert not torch.equal(three[1], three[3]) and not torch.equal(three[2], three[4])
    with pytest.raises(ValueError, match="draws"):
        ViewsDataset(records, spec, seed=5, draws=0)


def test_rotate_run_rotates_the_checkpoint_once(tiny_checkpoint: Path, tiny_config: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run)
    before, _ = load_model(run)
    cfg = build_config(tiny_config, "code_rotation.steps=20", "code_rotation.holdout=0.25")
    result = rotate_run(run, cfg)
    ckpt = resolve_checkpoint(run)
    record = rotation_record(ckpt)
    assert record is not None and record == json.loads((ckpt / RECORD_FILE).read_text())
    assert record["report"]["measured_on"] == "held-out classes"
    assert 0 < record["fit_images"] < record["images"]
    assert record["orthogonality_error"] < 1e-4
    assert result["checkpoint"] == str(ckpt)
    after, saved = load_model(run)
    assert saved.code_rotation.steps == 20  # the checkpoint's config says what was applied
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        e, f = before(images), after(images)
    assert torch.allclose(f @ f.T, e @ e.T, atol=1e-5)
    assert record["report"]["before"]["clean_float"] == record["report"]["after"]["clean_float"]
    with pytest.raises(CheckpointError, match="already holds a code rotation"):
        rotate_run(run, cfg)


def test_rotate_run_with_draws_and_an_extra_label(tiny_checkpoint: Path, tiny_config: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run)
    cfg = build_config(tiny_config, "code_rotation.steps=5", "code_rotation.draws=2",
                       "code_rotation.extra_labels.category=0.5", "code_rotation.holdout=0.25")
    record = rotate_run(run, cfg)
    assert record["settings"]["draws"] == 2 and record["settings"]["extra_labels"] == {"category": 0.5}
    assert record["views"] == ["clean", "camera", "scene", "camera_2", "scene_2"]
    for when in ("before", "after"):
        assert 0.0 <= record["report"][when]["category_avg_p@20_binary"] <= 100.0
    assert record["report"]["before"]["category_avg_p@20_float"] == record["report"]["after"]["category_avg_p@20_float"]
    assert load_model(run)[1].code_rotation.extra_labels == {"category": 0.5}


def test_rotate_run_refuses_a_multi_valued_or_repeated_extra_label(tiny_checkpoint: Path, tiny_config: dict,
                                                       tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run)
    with pytest.raises(ConfigError, match="several values per image"):
        rotate_run(run, build_config(tiny_config, "code_rotation.steps=2", "code_rotation.extra_labels.attributes=1"))
    with pytest.raises(ConfigError, match="already the label"):
        rotate_run(run, build_config(tiny_config, "code_rotation.steps=2", "code_rotation.extra_labels.identity=1"))
    assert rotation_record(resolve_checkpoint(run)) is None


def test_rotate_run_refuses_an_older_checkpoint(tiny_checkpoint: Path, tiny_config: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run)
    newest = resolve_checkpoint(run)
    older = newest.parent / "step_00000001"
    shutil.copytree(newest, older)
    with pytest.raises(CheckpointError, match="not the newest checkpoint"):
        rotate_run(older, build_config(tiny_config, "code_rotation.steps=2"))
    assert resolve_checkpoint(run) == newest and rotation_record(newest) is None


def test_rotate_run_refuses_zero_steps(tiny_checkpoint: Path, tiny_config: dict) -> None:
    with pytest.raises(ConfigError, match=r"code_rotation\.steps is 0"):
        rotate_run(tiny_checkpoint, build_config(tiny_config))


def test_embed_views_shape(tiny_checkpoint: Path, synth_dir: Path) -> None:
    model, cfg = load_model(tiny_checkpoint)
    records = read_manifest(synth_dir / "train.jsonl")[:5]
    emb = embed_views(model, ViewsDataset(records, cfg.preprocess_spec, 0), batch_size=2)
    assert emb.shape == (5, 3, cfg.model.embedding_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5, 3), atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("code_rotation.steps=-1", "steps must be >= 0"),
    ("code_rotation.beta=0", "lr, beta and temperature > 0"),
    ("code_rotation.holdout=1.0", "holdout in"),
    ("code_rotation.draws=0", "draws >= 1"),
    ("code_rotation.extra_labels.subcategory=0", "weights must be numbers > 0"),
    ("code_rotation.extra_labels.subcategory=yes", "weights must be numbers > 0"),
])
def test_config_rejects_bad_settings(tiny_config: dict, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(tiny_config, override)


def test_config_rejects_rotation_with_saturation(tiny_config: dict) -> None:
    with pytest.raises(ConfigError, match="saturation"):
        build_config(tiny_config, "code_rotation.steps=10", "model.saturation=3")


def test_training_ends_with_the_rotation_and_export_records_it(tiny_config: dict, tmp_path: Path) -> None:
    from model_export.export import ExportOptions, export_checkpoint
    from training.train import run_training

    cfg = build_config(tiny_config, "train.max_steps=2", "code_rotation.steps=5")
    summary = run_training(cfg, tmp_path / "run")
    assert summary["code_rotation"]["checkpoint"].endswith("step_00000002")
    assert rotation_record(resolve_checkpoint(tmp_path / "run")) is not None
    events = [json.loads(line)["event"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events[-2:] == ["end", "code_rotation"]
    # Resuming the finished run keeps the rotation it has instead of rotating twice.
    again = run_training(build_config(tiny_config, "train.max_steps=2", "code_rotation.steps=5"), tmp_path / "run")
    assert "already holds" in again["code_rotation"]["skipped"]
    manifest = export_checkpoint(tmp_path / "run", tmp_path / "artifact",
                                 ExportOptions(formats=["onnx"], onnx_simplify="off"), log=lambda _: None)
    recorded = manifest.data["model"]["code_rotation"]
    assert recorded["settings"]["steps"] == 5 and recorded["label_key"] == "identity"
    assert recorded["views"] == ["clean", "camera", "scene"]
    assert manifest.parity["onnx"]["bits_agree"] == 1.0
