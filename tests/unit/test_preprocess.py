"""The shared preprocessing: every Pillow mode to RGB, resize policies, normalization."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from uembed.preprocess import PreprocessSpec, to_rgb


def test_transparent_pixels_composite_over_the_background() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = np.asarray(to_rgb(rgba, (0, 0, 255)))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[1, 1]) == (0, 0, 255)


def test_palette_with_transparency_and_la() -> None:
    p = Image.new("P", (2, 2), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0
    out = np.asarray(to_rgb(p, (255, 255, 255)))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (200, 100, 50)
    la = Image.new("LA", (1, 1), (100, 128))
    assert np.asarray(to_rgb(la, (0, 0, 0)))[0, 0, 0] == pytest.approx(50, abs=1)


def test_16bit_grey_is_scaled_not_clipped() -> None:
    img = Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16))
    assert img.mode.startswith("I;16")
    assert np.asarray(to_rgb(img))[0, 0, 0] == 128


def test_cmyk_and_grey() -> None:
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((1, 1)) == (7, 7, 7)


@pytest.mark.parametrize("policy", ["center_crop", "stretch", "letterbox"])
@pytest.mark.parametrize("size", [(1, 1), (300, 40), (40, 300), (64, 64)])
def test_every_policy_gives_the_input_size(policy: str, size: tuple[int, int]) -> None:
    spec = PreprocessSpec(input_size=32, resize=policy)
    arr = spec.to_array(Image.new("RGB", size, (10, 200, 30)))
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32


def test_letterbox_pads_with_the_background_and_center_crop_cuts() -> None:
    wide = Image.new("RGB", (64, 16), (0, 0, 0))
    lb = PreprocessSpec(input_size=16, resize="letterbox", mean=(0, 0, 0), std=(1, 1, 1)).to_array(wide)
    assert lb[:, 0, 0] == pytest.approx([1, 1, 1]) and lb[:, 8, 8] == pytest.approx([0, 0, 0])
    cc = PreprocessSpec(input_size=16, resize="center_crop", mean=(0, 0, 0), std=(1, 1, 1)).to_array(wide)
    assert float(cc.max()) == 0.0


def test_normalization_is_mean_std() -> None:
    spec = PreprocessSpec(input_size=8, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    arr = spec.to_array(Image.new("RGB", (8, 8), (255, 0, 51)))
    assert arr[:, 0, 0] == pytest.approx([1.0, -1.0, 0.2], abs=1e-6)


def test_roundtrip_dict_and_validation() -> None:
    spec = PreprocessSpec(input_size=48, resize="letterbox", alpha_background=(0, 0, 0))
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessSpec.from_dict({"input_size": 32, "colour": 1})
    with pytest.raises(ValueError, match="resize"):
        PreprocessSpec(resize="zoom")  # type: ignore[arg-type]


def test_load_applies_exif_orientation(tmp_path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: the blue half ends on top
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    path = tmp_path / "o.jpg"
    path.write_bytes(buf.getvalue())
    spec = PreprocessSpec(input_size=20, resize="stretch", mean=(0, 0, 0), std=(1, 1, 1))
    arr = spec.load(str(path))
    assert arr[2, 2, 10] > 0.8 and arr[0, 17, 10] > 0.8  # blue top, red bottom
