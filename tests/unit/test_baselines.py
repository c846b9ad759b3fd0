"""The ablation's baselines (16x16 pixels, untrained network) and the scene-crop augmentation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from training.data.augment import TrainTransform, scene_crop, zoom_out
from training.evaluate import PixelBaseline, evaluate_baseline
from uembed.cli import main
from uembed.preprocess import PreprocessSpec


def test_pixel_baseline_is_normalized_pooled_pixels() -> None:
    x = torch.randn(3, 3, 64, 64)
    emb = PixelBaseline(16)(x)
    assert emb.shape == (3, 768)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3))
    expected = torch.nn.functional.avg_pool2d(x, 4).flatten(1)
    assert torch.allclose(emb, expected / expected.norm(dim=1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("baseline", ["pixels", "untrained"])
def test_baseline_reports_every_eval_set(tiny_config: dict[str, Any], tmp_path: Path, baseline: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    out = tmp_path / baseline / "eval.json"
    assert main(["evaluate", "--config", str(config), "--baseline", baseline, "--out", str(out),
                 "--workers", "0"]) == 0
    report = json.loads(out.read_text())
    assert report["baseline"] == baseline and set(report["results"]) == {"heldout"}
    for kind in ("float", "binary"):
        assert 0.0 <= report["results"]["heldout"][kind]["p@1"] <= 1.0
        assert report["results"]["heldout"][kind]["queries"] > 0
    assert out.with_suffix(".md").read_text().startswith("| set |")
    # Deterministic: the untrained network is seeded by the config.
    again = evaluate_baseline(config, baseline, tmp_path / "again.json", num_workers=0)
    assert again["results"] == report["results"]


def test_evaluate_needs_a_run_or_a_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate"]) == 2
    assert "--run" in capsys.readouterr().err
    assert main(["evaluate", "--baseline", "pixels"]) == 2
    assert "--config" in capsys.readouterr().err


def test_scene_crop_is_seeded_and_keeps_the_product() -> None:
    product = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    product.paste((255, 0, 255, 255), (8, 8, 56, 56))
    a = scene_crop(product, np.random.default_rng(5))
    b = scene_crop(product, np.random.default_rng(5))
    assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    arr = np.asarray(a, dtype=np.int32)
    magenta = (arr[..., 0] > 200) & (arr[..., 1] < 60) & (arr[..., 2] > 200)
    assert magenta.mean() > 0.15  # the product fills a good part of its loose box
    assert not np.array_equal(np.asarray(scene_crop(product, np.random.default_rng(6))), np.asarray(a))
    # The camera level mixes clean, camera and scene renderings, each a function of the seed.
    t = TrainTransform(PreprocessSpec(input_size=32), "camera")
    outs = [t(product, s) for s in range(12)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert np.array_equal(t(product, 3), outs[3])


def test_zoom_out_pads_with_the_background_and_keeps_the_product_whole() -> None:
    product = Image.new("RGB", (40, 30), (255, 0, 255))
    out = zoom_out(product, np.random.default_rng(1), max_pad=0.35, fill=(255, 255, 255))
    w, h = out.size
    assert 40 <= w <= 40 + 2 * 14 and 30 <= h <= 30 + 2 * 11 and (w, h) != (40, 30)
    arr = np.asarray(out, dtype=np.int32)
    magenta = (arr[..., 0] == 255) & (arr[..., 1] == 0) & (arr[..., 2] == 255)
    assert magenta.sum() == 40 * 30  # every product pixel, nothing cut
    assert ((arr == 255).all(axis=2) | magenta).all()  # the rest is the fill
    assert np.array_equal(np.asarray(zoom_out(product, np.random.default_rng(1))), np.asarray(out))


def test_camera_level_shows_clean_drawings_zoomed_out_too() -> None:
    # A drawing that fills its frame: some clean views must show the white margin of a zoom-out.
    product = Image.new("RGBA", (64, 64), (255, 0, 255, 255))
    t = TrainTransform(PreprocessSpec(input_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), "camera")
    white_margin = 0
    for seed in range(40):
        x = t(product, seed)
        border = np.concatenate([x[:, 0, :], x[:, -1, :], x[:, :, 0], x[:, :, -1]], axis=1)
        white_margin += int((border.min(axis=0) > 0.6).mean() > 0.5)
    assert 2 <= white_margin < 40
