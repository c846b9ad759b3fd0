"""The one definition of image preprocessing, shared by training, export checks and serving.

Only numpy and Pillow (with the pillow-heif plugin) are used here so that the service can import it
without torch. The `PreprocessSpec` travels inside every checkpoint config and every artifact
manifest; whatever reads an image for the model goes through `PreprocessSpec.to_array`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

try:  # HEIC/HEIF (what phone cameras save) for every reader: training folders, export checks, serving.
    import pillow_heif  # libheif applies a HEIF's rotation itself and resets its EXIF orientation

    pillow_heif.register_heif_opener()
except ImportError:  # a base dependency; without it a HEIC file is simply not an image Pillow knows
    pass

ResizePolicy = Literal["center_crop", "stretch", "letterbox"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Image.resize first shrinks by an integer factor (Image.reduce) where the ratio is at least twice this.
REDUCING_GAP = 3.0

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How an RGB image becomes a normalized CHW float32 array of `input_size` x `input_size`.

    resize: `center_crop` scales the shorter side to `input_size` and crops the centre;
    `stretch` scales both sides to `input_size` (aspect ratio lost, nothing cut);
    `letterbox` scales the longer side and pads with `alpha_background` (nothing cut or distorted).
    Transparent pixels are composited over `alpha_background`, the way the model was trained.
    """

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: ResizePolicy = "center_crop"
    interpolation: str = "bilinear"
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    _scale: np.ndarray = field(init=False, repr=False, compare=False)
    _offset: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.input_size < 8:
            raise ValueError(f"input_size must be >= 8, got {self.input_size}")
        if self.resize not in ("center_crop", "stretch", "letterbox"):
            raise ValueError(f"unknown resize policy {self.resize!r}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; one of {sorted(_RESAMPLE)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values, std > 0")
        # Normalization folded into one multiply-add: (x / 255 - mean) / std.
        std = np.asarray(self.std, dtype=np.float32)
        object.__setattr__(self, "_scale", (1.0 / (255.0 * std)).reshape(3, 1, 1))
        object.__setattr__(
            self, "_offset", (-np.asarray(self.mean, dtype=np.float32) / std).reshape(3, 1, 1)
        )
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "alpha_background", tuple(int(v) for v in self.alpha_background))

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_scale", None)
        d.pop("_offset", None)
        d["mean"], d["std"], d["alpha_background"] = (
            list(self.mean),
            list(self.std),
            list(self.alpha_background),
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        known = {"input_size", "mean", "std", "resize", "interpolation", "alpha_background"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        kw = dict(d)
        for key in ("mean", "std", "alpha_background"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)

    # -- the pipeline --------------------------------------------------------------------------
    def to_rgb(self, image: Image.Image) -> Image.Image:
        """Any Pillow mode to RGB: alpha composited over the background, 16-bit scaled, CMYK converted."""
        return to_rgb(image, self.alpha_background)

    def resize_image(self, image: Image.Image) -> Image.Image:
        """Geometry only: RGB image in, RGB image of input_size x input_size out."""
        size = self.scaled_size(*image.size)
        if size != image.size:
            image = image.resize(size, self.resample, reducing_gap=REDUCING_GAP)
        return self.place(image)

    @property
    def resample(self) -> Image.Resampling:
        return _RESAMPLE[self.interpolation]

    def scaled_size(self, w: int, h: int) -> tuple[int, int]:
        """The size `resize_image` scales a w x h image to before it crops or pads it (`place`)."""
        s = self.input_size
        if self.resize == "stretch":
            return s, s
        if self.resize == "center_crop":
            scale = s / min(w, h)
            return max(s, round(w * scale)), max(s, round(h * scale))
        scale = s / max(w, h)
        return max(1, round(w * scale)), max(1, round(h * scale))

    def place(self, image: Image.Image) -> Image.Image:
        """A scaled image (`scaled_size`) to input_size x input_size: the centre crop or the letterbox."""
        s = self.input_size
        nw, nh = image.size
        if self.resize == "stretch":
            return image
        if self.resize == "center_crop":
            left, top = (nw - s) // 2, (nh - s) // 2
            return image.crop((left, top, left + s, top + s)) if (nw, nh) != (s, s) else image
        canvas = Image.new("RGB", (s, s), self.alpha_background)
        canvas.paste(image, ((s - nw) // 2, (s - nh) // 2))
        return canvas

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB -> CHW float32 normalized."""
        chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
        chw *= self._scale
        chw += self._offset
        return chw

    def to_array(self, image: Image.Image) -> np.ndarray:
        """The full pipeline for a decoded image: RGB, resize, normalize -> (3, S, S) float32."""
        rgb = self.resize_image(self.to_rgb(image))
        return self.normalize(np.asarray(rgb, dtype=np.uint8))

    def load(self, path: str) -> np.ndarray:
        """Read a file the way training and export checks do (EXIF orientation applied)."""
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return self.to_array(im)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow image mode to RGB; transparency is composited over `background`."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow's own convert clips 16/32-bit values at 255; scale to the real range instead.
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode == "I" and hi <= 255:
            hi = 255.0
        arr8 = np.clip(arr * (255.0 / hi), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode in ("RGBA", "LA", "RGBa", "La", "PA") or (mode == "L" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")
