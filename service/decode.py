"""Image bytes -> the model's input array, safely.

Pillow opens only the formats we accept (no EPS/PDF/... parsers reachable from the network). The
size is checked against the pixel limit before any pixel is decoded (decompression bombs). Large
JPEGs are decoded at reduced scale through draft mode. EXIF orientation is applied, animated
images use their first frame, every mode becomes RGB the way training composited it, then the
manifest's preprocessing (the same code training used) makes the array.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from uembed.preprocess import REDUCING_GAP, PreprocessSpec

# MPO (multi-picture camera JPEGs) opens through the JPEG factory. AVIF is Pillow's own plugin;
# HEIF (HEIC, what phone cameras save) comes from pillow-heif, registered by uembed.preprocess.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")
# Content types a raw body may declare; octet-stream means "sniff it".
RAW_CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff",
                     "image/avif", "image/heic", "image/heif", "application/octet-stream")


# What Pillow and its plugins raise on bad data: OSError and friends from the built-in decoders;
# RuntimeError from the AVIF plugin ("Decoding of color planes failed") and EOFError from libheif
# ("Unexpected end of file"), both seen in a mutation fuzz.
DECODER_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError, EOFError)


class ApiError(Exception):
    """A client-visible failure: HTTP status, machine code, human detail (and the image index)."""

    def __init__(self, status: int, code: str, detail: str, index: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.index = status, code, detail, index
        self.headers = headers or {}

    def at(self, index: int) -> ApiError:
        return ApiError(self.status, self.code, f"image {index}: {self.detail}", index, self.headers)


@dataclass(frozen=True)
class DecodeLimits:
    max_image_bytes: int
    max_image_pixels: int


def decode_image(data: bytes, spec: PreprocessSpec, limits: DecodeLimits, helper: Executor | None = None
                 ) -> np.ndarray:
    """Encoded bytes -> (3, S, S) float32, or ApiError naming what is wrong.

    With a `helper` thread pool that has a thread to spare, a large baseline JPEG is decoded on two
    threads (`TopBand`); the array is the same, to the bit."""
    if not data:
        raise ApiError(400, "empty_image", "the image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise ApiError(413, "image_too_large",
                       f"the image is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    try:
        im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise ApiError(400, "not_an_image", f"not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})"
                       ) from None
    except Image.DecompressionBombError as e:
        raise ApiError(413, "too_many_pixels", str(e)) from None
    except DECODER_ERRORS as e:
        raise ApiError(400, "corrupt_image", f"the image header cannot be read: {e}") from None
    with im:
        w, h = im.size
        if w < 1 or h < 1:
            raise ApiError(400, "corrupt_image", f"the image has no pixels ({w}x{h})")
        if w * h > limits.max_image_pixels:
            raise ApiError(413, "too_many_pixels",
                           f"{w}x{h} = {w * h} pixels; the limit is {limits.max_image_pixels}")
        if im.format in ("JPEG", "MPO"):
            _draft(im, spec.input_size)
        band = TopBand.start(im, data, spec, helper) if helper is not None else None
        try:
            im.load()  # the first frame of an animation
        except (*DECODER_ERRORS, Image.DecompressionBombError) as e:
            text = str(e)
            if any(p in text.lower() for p in ("truncated", "premature end", "end of file")):
                raise ApiError(400, "truncated_image", f"the image data ends early ({text})") from None
            raise ApiError(400, "corrupt_image", f"the image data cannot be decoded ({text})") from None
        # A broken EXIF block must not fail an otherwise good image. In place: without an
        # orientation tag the default returns a full-size copy (0.5 ms of the 8 ms a bench image takes).
        with contextlib.suppress(Exception):
            ImageOps.exif_transpose(im, in_place=True)
        try:
            if band is not None:
                return spec.normalize(np.asarray(spec.place(band.finish(im)), dtype=np.uint8))
            return spec.to_array(im)
        except DECODER_ERRORS as e:
            raise ApiError(400, "corrupt_image", f"the image cannot be converted to RGB ({e})") from None


def _draft(im: Image.Image, input_size: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the image is far larger than needed.

    The requested size keeps the shorter side >= 2x the model input, so the final resize still
    downsamples (and antialiases) as it does for full-size decodes.
    """
    w, h = im.size
    short = min(w, h)
    target = 2 * input_size
    if short < 2 * target:
        return
    scale = target / short
    im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))


# Below this many decoded pixels the horizontal resize pass is too short (about 0.3 ms on the bench
# machine) to pay for a second thread and a second parse of the header.
MIN_SPLIT_PIXELS = 100_000
# Rough costs on one core, only their ratios matter: libjpeg's decode per byte of input and per pixel
# out (mostly entropy decoding, which runs in order), and the horizontal resize pass per pixel in.
_DECODE_NS_PER_BYTE, _DECODE_NS_PER_PIXEL, _RESIZE_NS_PER_PIXEL = 10.0, 1.5, 3.3
# The helper's start (waking a thread, parsing the header again) and how much slower it runs than the
# estimates say (two decoders at once share the caches).
_HELPER_START_NS, _HELPER_SLOWDOWN = 150_000.0, 1.1


class TopBand:
    """A JPEG's first rows decoded and resized horizontally on a helper thread, while the caller
    decodes the whole image and resizes the remaining rows: the resize starts before the decode ends.

    Pillow resizes in two passes, each row horizontally into a (new width x old height) image, then
    each column vertically, rounding to 8 bits in between. The horizontal pass treats every row on
    its own with coefficients that depend only on the widths, so rows resized in two bands and put
    together are the rows of the one-call pass, and the vertical pass over them gives what
    `Image.resize` gives, to the bit (tests/unit/test_decode.py checks it over many geometries).
    libjpeg writes rows from the top and a row does not depend on the rows after it, so the helper
    stops decoding after the band. It costs a second pass of entropy decoding over the band's part of
    the file, on a core that would otherwise wait: only for an otherwise idle server
    (service/api.py `_direct`, while one client connection is open).

    Used only where `Image.resize` is these two passes in this order (`horizontal_pass_first`): a
    baseline (not progressive) RGB JPEG with no EXIF rotation to apply. A check at first use
    (`_split_is_exact`) turns the split off for good if the installed Pillow resizes otherwise.
    """

    def __init__(self, future: Future, rows: int, size: tuple[int, int], resample: Image.Resampling) -> None:
        self.future, self.rows, self.size, self.resample = future, rows, size, resample

    @classmethod
    def start(cls, im: Image.Image, data: bytes, spec: PreprocessSpec, helper: Executor) -> TopBand | None:
        """The band started on `helper` for `im` (opened, drafted, not loaded), or None where the
        split would not give `Image.resize`'s result or would not pay."""
        w, h = im.size
        if (im.format != "JPEG" or im.mode != "RGB" or w * h < MIN_SPLIT_PIXELS or len(im.tile) != 1
                or im.tile[0][0] != "jpeg" or im.info.get("progressive") or im.info.get("progression")):
            return None
        nw, nh = spec.scaled_size(w, h)
        if not horizontal_pass_first(w, h, nw, nh) or not _split_is_exact():
            return None
        try:  # exif_transpose would turn the image before the resize
            if "exif" in im.info and im.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
                return None
        except Exception:
            return None
        # Both threads should end together: the helper decodes and resizes the first `rows` (a
        # fraction f), the caller decodes all rows and resizes the rest:
        #     HELPER_SLOWDOWN * f * (decode + resize) + HELPER_START_NS = decode + (1 - f) * resize.
        # A helper that ends late costs the whole request its delay; one that ends early costs only
        # the resize of the rows it could have taken, so the estimates lean towards fewer rows.
        decode = _DECODE_NS_PER_BYTE * len(data) + _DECODE_NS_PER_PIXEL * w * h
        resize = _RESIZE_NS_PER_PIXEL * w * h
        f = (decode + resize - _HELPER_START_NS) / (_HELPER_SLOWDOWN * (decode + resize) + resize)
        rows = min(h - 1, round(h * f))
        if rows < 1:
            return None
        resample = spec.resample
        try:
            future = helper.submit(_top_rows, data, spec.input_size, (w, h), rows, nw, resample)
        except RuntimeError:  # the pool is shutting down
            return None
        return cls(future, rows, (nw, nh), resample)

    def finish(self, im: Image.Image) -> Image.Image:
        """The whole decoded image `im` -> what `im.resize(size)` gives."""
        w, h = im.size
        (nw, nh), r = self.size, self.rows
        bottom = im.crop((0, r, w, h)).resize((nw, h - r), self.resample)
        try:
            top = self.future.result()
        except Exception:  # cannot happen with a good image (the caller decoded it); still exact
            top = None
        if top is None or top.size != (nw, r):
            top = im.crop((0, 0, w, r)).resize((nw, r), self.resample)
        return _vertical_pass(top, bottom, nh, self.resample)


def banded_resize(im: Image.Image, rows: int, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """`im.resize(size)` as `TopBand` does it, on one thread: the first `rows` rows and the others
    resized horizontally apart, then one vertical pass over both."""
    w, h = im.size
    top = im.crop((0, 0, w, rows)).resize((size[0], rows), resample)
    bottom = im.crop((0, rows, w, h)).resize((size[0], h - rows), resample)
    return _vertical_pass(top, bottom, size[1], resample)


def _vertical_pass(top: Image.Image, bottom: Image.Image, height: int, resample: Image.Resampling) -> Image.Image:
    """Two horizontally resized bands of one image, stacked and resized to `height`."""
    rows = Image.new("RGB", (top.width, top.height + bottom.height))
    rows.paste(top, (0, 0))
    rows.paste(bottom, (0, top.height))
    return rows.resize((top.width, height), resample) if height != rows.height else rows


def _top_rows(data: bytes, input_size: int, size: tuple[int, int], rows: int, width: int,
              resample: Image.Resampling) -> Image.Image | None:
    """The first `rows` of the JPEG, decoded as the caller decodes it and resized to `width`."""
    with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
        _draft(im, input_size)
        if im.size != size or im.mode != "RGB" or len(im.tile) != 1:
            return None
        im.tile = [(im.tile[0][0], (0, 0, size[0], rows), *im.tile[0][2:])]
        with contextlib.suppress(*DECODER_ERRORS):
            # libjpeg stops after `rows` rows and then reports the rows it was not asked for
            # ("broken data stream"); the rows it wrote are complete. A genuinely bad file fails the
            # caller's own decode, which then does not use these rows.
            im.load()
        im.tile = []
        return im.crop((0, 0, size[0], rows)).resize((width, rows), resample)


def horizontal_pass_first(w: int, h: int, nw: int, nh: int) -> bool:
    """Whether `Image.resize((nw, nh), reducing_gap=REDUCING_GAP)` of a w x h image is a horizontal
    pass over every row followed by a vertical pass (or no vertical pass).

    Excluded: no horizontal scaling; the integer pre-shrink (Image.reduce) Pillow adds at ratios of
    2 x REDUCING_GAP and more; and the height shrinking by more than twice what the width does, where
    Pillow 13 runs the vertical pass first (older versions always ran the horizontal one first).
    """
    if nw == w or int(w / nw / REDUCING_GAP) > 1 or int(h / nh / REDUCING_GAP) > 1:
        return False
    return h - nh <= 2 * (w - nw)


@functools.cache
def _split_is_exact() -> bool:
    """Once per process: does the installed Pillow resize as `TopBand` assumes? Random images of
    shapes on both sides of the pass-order rule, resized in one call and in two bands."""
    rng = np.random.default_rng(0)
    for (w, h), (nw, nh), resample in [((300, 200), (128, 85), Image.Resampling.BILINEAR),
                                       ((200, 260), (96, 125), Image.Resampling.BICUBIC),
                                       ((150, 150), (64, 64), Image.Resampling.LANCZOS)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = im.resize((nw, nh), resample, reducing_gap=REDUCING_GAP)
        if (not horizontal_pass_first(w, h, nw, nh)
                or banded_resize(im, h // 3, (nw, nh), resample).tobytes() != want.tobytes()):
            return False
    return True
