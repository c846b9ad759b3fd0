"""Decoding real encoded bytes of every kind a user may upload, and the ones we must refuse."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image

from service.decode import ApiError, DecodeLimits, decode_image
from service.encoding import encode, pack_binary
from tests.service_helpers import encode_image, photo
from uembed.preprocess import PreprocessSpec

SPEC = PreprocessSpec(input_size=32)
LIMITS = DecodeLimits(max_image_bytes=1 << 20, max_image_pixels=4_000_000)


def decode(data: bytes, limits: DecodeLimits = LIMITS) -> np.ndarray:
    return decode_image(data, SPEC, limits)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF"])
def test_every_accepted_format(fmt: str) -> None:
    arr = decode(photo(1, fmt=fmt))
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    if fmt not in ("PNG", "GIF"):  # the same picture as its lossless PNG, up to the codec's loss
        assert np.abs(arr - decode(photo(1, fmt="PNG"))).mean() < 0.1


def test_matches_the_training_preprocessing_for_a_png() -> None:
    data = photo(2, fmt="PNG")
    import io

    expected = SPEC.to_array(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(decode(data), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    base = Image.new("RGB", (20, 20), (200, 30, 30))
    img = base.convert(mode) if mode != "I;16" else Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    assert decode(encode_image(img, fmt)).shape == (3, 32, 32)


def test_transparent_pixels_become_the_training_background() -> None:
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black
    white = decode(encode_image(Image.new("RGB", (10, 10), (255, 255, 255)), "PNG"))
    np.testing.assert_allclose(decode(encode_image(img, "PNG")), white, atol=1e-6)


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:])
    arr = decode(data)
    assert arr[0].mean() > arr[2].mean()  # red, not blue


@pytest.mark.parametrize("fmt", ["JPEG", "AVIF", "HEIF"])  # HEIF: libheif turns it, not the EXIF tag
def test_exif_orientation_is_applied(fmt: str) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    spec = PreprocessSpec(input_size=20, resize="stretch")
    arr = decode_image(encode_image(img, fmt, exif=exif.tobytes(), quality=95), spec, LIMITS)
    assert arr[2, 2, 10] > arr[0, 2, 10] and arr[0, 17, 10] > arr[2, 17, 10]  # blue on top after rotation


def test_large_jpeg_is_drafted_and_close_to_a_full_decode() -> None:
    data = photo(3, size=(1600, 1200), fmt="JPEG")
    drafted = decode(data, DecodeLimits(1 << 22, 4_000_000))
    import io

    full = SPEC.to_array(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.abs(drafted - full).mean() < 0.05


def _noisy_jpeg(rng: np.random.Generator, w: int, h: int, **save: object) -> bytes:
    """A photo-like JPEG: smooth colour plus grain, so every block has detail to resize."""
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-20, 21, (h, w, 3), dtype=np.int16)
    return encode_image(Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)), "JPEG", **save)


def test_a_jpeg_decoded_on_two_threads_is_the_same_array() -> None:
    """TopBand (a helper thread decodes and resizes the first rows) against the one-thread decode,
    to the bit, over sizes, chroma subsampling, draft scales, restart markers, progressive files
    (not split), crop/stretch/letterbox and three filters; many of them must really split."""
    from concurrent.futures import ThreadPoolExecutor

    class Counting(ThreadPoolExecutor):
        submitted = 0

        def submit(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def,override]
            self.submitted += 1
            return super().submit(*args, **kwargs)  # type: ignore[arg-type]

    rng = np.random.default_rng(7)
    limits = DecodeLimits(1 << 26, 50_000_000)
    with Counting(1) as helper:
        for _ in range(40):
            w, h = (int(v) for v in rng.integers(300, 1800, 2))
            spec = PreprocessSpec(input_size=int(rng.choice([64, 128, 224])),
                                  resize=str(rng.choice(["center_crop", "stretch", "letterbox"])),
                                  interpolation=str(rng.choice(["bilinear", "bicubic", "lanczos"])))
            save: dict[str, object] = {"quality": int(rng.integers(60, 98)), "subsampling": int(rng.integers(0, 3))}
            if rng.random() < 0.2:
                save["restart_marker_rows"] = 1
            data = _noisy_jpeg(rng, w, h, progressive=bool(rng.random() < 0.15), **save)
            np.testing.assert_array_equal(decode_image(data, spec, limits, helper), decode_image(data, spec, limits),
                                          err_msg=f"{w}x{h} {spec} {save}")
    assert helper.submitted >= 12, helper.submitted


def test_split_decode_is_only_used_where_it_is_exact() -> None:
    """No split for a progressive file, an EXIF rotation, a small image, a PNG, or a shrink that
    Pillow runs vertical pass first; the band resize rule against Image.resize on random shapes."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    from service.decode import TopBand, banded_resize, horizontal_pass_first

    rng = np.random.default_rng(8)
    spec = PreprocessSpec(input_size=128)
    cases = {
        "baseline": (_noisy_jpeg(rng, 640, 480), True),
        "EXIF orientation 1": (_noisy_jpeg(rng, 640, 480, exif=_orientation(1)), True),
        "progressive": (_noisy_jpeg(rng, 640, 480, progressive=True), False),
        "EXIF rotation": (_noisy_jpeg(rng, 640, 480, exif=_orientation(6)), False),
        "small": (_noisy_jpeg(rng, 320, 240), False),
        "PNG": (photo(1, size=(640, 480), fmt="PNG"), False),
        "tall (vertical pass first)": (_noisy_jpeg(rng, 300, 900), False),
        "grey": (encode_image(Image.new("L", (640, 480), 90), "JPEG"), False),
    }
    with ThreadPoolExecutor(1) as helper:
        for name, (data, expected) in cases.items():
            with Image.open(io.BytesIO(data)) as im:
                band = TopBand.start(im, data, spec, helper)
                assert (band is not None) == expected, name
                if band is not None:
                    band.future.result()
            np.testing.assert_array_equal(decode_image(data, spec, LIMITS, helper), decode_image(data, spec, LIMITS))
    checked = 0
    for _ in range(300):
        w, h, nw, nh = (int(v) for v in rng.integers(16, 400, 4))
        if not horizontal_pass_first(w, h, nw, nh):
            continue
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        r = int(rng.integers(1, h))
        want = im.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
        got = banded_resize(im, r, (nw, nh), Image.Resampling.BILINEAR)
        assert got.tobytes() == want.tobytes(), (w, h, nw, nh, r)
        checked += 1
    assert checked > 50


def test_a_damaged_jpeg_gets_the_same_answer_with_a_helper() -> None:
    """Cut short (an error) or with zeroed entropy data (libjpeg may decode garbage): whatever the
    one-thread decode answers, the two-thread one answers the same."""
    from concurrent.futures import ThreadPoolExecutor

    data = _noisy_jpeg(np.random.default_rng(9), 640, 480)
    spec = PreprocessSpec(input_size=128)

    def outcome(blob: bytes, helper: ThreadPoolExecutor | None) -> object:
        try:
            return decode_image(blob, spec, LIMITS, helper).tobytes()
        except ApiError as e:
            return e.status, e.code

    with ThreadPoolExecutor(1) as helper:
        cut = data[: len(data) // 2]
        assert outcome(cut, None) == (400, "truncated_image")
        for bad in (cut, data[:2000] + bytes(len(data) // 3) + data[2000 + len(data) // 3:]):
            assert outcome(bad, helper) == outcome(bad, None)


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def _damaged_pixels() -> bytes:
    data = bytearray(photo(6, size=(64, 64), fmt="PNG"))
    start = data.index(b"IDAT") + 8
    data[start : start + 64] = bytes(64)  # zero a run of the zlib stream, keep the length
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "empty_image"),
        (b"this is not an image at all", 400, "not_an_image"),
        (photo(4, fmt="PNG")[:200], 400, "truncated_image"),
        (encode_image(Image.new("RGB", (8, 8)), "ICO"), 400, "not_an_image"),  # a format we do not open
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, "not_an_image"),  # a broken header
        (_damaged_pixels(), 400, "corrupt_image"),  # a good header, damaged compressed data
        (photo(5, size=(64, 48), fmt="AVIF")[:-60], 400, "truncated_image"),
        (photo(5, size=(64, 48), fmt="HEIF")[:-60], 400, "truncated_image"),
    ],
)
def test_bad_bytes_get_a_clear_error(data: bytes, status: int, code: str) -> None:
    with pytest.raises(ApiError) as err:
        decode(data)
    assert (err.value.status, err.value.code) == (status, code)


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_damaged_avif_and_heic_data_is_a_clear_error(fmt: str) -> None:
    # Each byte of the coded data's tail zeroed in turn. Some of these make the AVIF plugin raise
    # RuntimeError ("Decoding of color planes failed") and libheif EOFError, not OSError.
    data = photo(5, size=(64, 48), fmt=fmt)
    codes = set()
    for i in range(len(data) - 256, len(data)):
        damaged = bytearray(data)
        damaged[i] = 0
        try:
            decode(bytes(damaged))
        except ApiError as e:
            assert e.status == 400, e.detail
            codes.add(e.code)
    assert codes and codes <= {"corrupt_image", "truncated_image", "not_an_image"}, codes


def test_limits_on_bytes_and_pixels() -> None:
    big = Image.new("1", (3000, 2000))  # 6M pixels, a few kB as PNG: a small decompression bomb
    with pytest.raises(ApiError) as err:
        decode(encode_image(big, "PNG"))
    assert err.value.status == 413 and err.value.code == "too_many_pixels"
    with pytest.raises(ApiError) as err:
        decode(photo(5, size=(400, 400), fmt="PNG"), DecodeLimits(max_image_bytes=1000, max_image_pixels=10**6))
    assert err.value.status == 413 and err.value.code == "image_too_large"


def test_one_pixel_images_are_embedded() -> None:
    assert decode(encode_image(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")).shape == (3, 32, 32)


def test_binary_is_packbits_of_the_sign_msb_first() -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((5, 20)).astype(np.float32)
    rows = encode(emb, "both")
    for vec, row in zip(emb, rows, strict=True):
        raw = np.frombuffer(base64.b64decode(row["binary"]), dtype=np.uint8)
        assert len(raw) == 3  # ceil(20 / 8)
        np.testing.assert_array_equal(np.unpackbits(raw)[:20], (vec > 0).astype(np.uint8))
        np.testing.assert_allclose(np.linalg.norm(row["float"]), 1.0, atol=1e-6)
    assert pack_binary(np.array([[1.0, -1, 0, 0, 0, 0, 0, 0, 2]]))[0] == base64.b64encode(bytes([128, 128])).decode()
    assert set(encode(emb, "float")[0]) == {"float"} and set(encode(emb, "binary")[0]) == {"binary"}
