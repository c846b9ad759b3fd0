"""Image bytes -> the model's input array, safely.

Pillow opens only the formats we accept (no EPS/PDF/... parsers reachable from the network). The
size is checked against the pixel limit before any pixel is decoded (decompression bombs). Large
JPEGs are decoded at reduced scale through draft mode. EXIF orientation is applied, animated
images use their first frame, every mode becomes RGB the way training composited it, then the
manifest's preprocessing (the same code training used) makes the array.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from uembed.preprocess import PreprocessSpec

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


def decode_image(data: bytes, spec: PreprocessSpec, limits: DecodeLimits) -> np.ndarray:
    """Encoded bytes -> (3, S, S) float32, or ApiError naming what is wrong."""
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
