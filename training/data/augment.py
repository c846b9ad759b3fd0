"""Seeded image augmentations (Pillow + numpy), ending in the shared `PreprocessSpec`.

Every random choice comes from an explicit `numpy.random.Generator`, so a sample's augmentation
depends only on its seed: data-loader workers, ranks and resumed runs all see the same pixels.
The "camera" level models the two shifts the evaluation measures: a phone photo of a product
(Pinterest Lens: perspective, blur, noise, lighting, JPEG; the same functions render the camera
evaluation queries) and a detector's crop out of a cluttered scene (Shop the Look: other objects
cut by the crop edges, a loose box, a textured background).
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from uembed.preprocess import PreprocessSpec

Level = Literal["none", "light", "camera"]


def random_resized_crop(
    img: Image.Image, rng: np.random.Generator, scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.crop((left, top, left + cw, top + ch))
    return img


def color_jitter(img: Image.Image, rng: np.random.Generator, strength: float = 0.3) -> Image.Image:
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return img


def perspective(img: Image.Image, rng: np.random.Generator, distortion: float = 0.2,
                fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A random homography moving each corner by up to `distortion` of the side."""
    w, h = img.size
    dx, dy = distortion * w / 2, distortion * h / 2
    src = [(0, 0), (w, 0), (w, h), (0, h)]
    dst = [(x + rng.uniform(-dx, dx), y + rng.uniform(-dy, dy)) for x, y in src]
    coeffs = _perspective_coeffs(dst, src)
    return img.transform((w, h), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR, fillcolor=fill)


def _perspective_coeffs(dst: list[tuple[float, float]], src: list[tuple[float, float]]) -> list[float]:
    # Solve for the 8 coefficients that map output pixel (x, y) back to input (u, v).
    rows = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    a = np.asarray(rows, dtype=np.float64)
    b = np.asarray([c for p in src for c in p], dtype=np.float64)
    return np.linalg.solve(a, b).tolist()


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def add_noise(img: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, sigma, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def lighting(img: Image.Image, rng: np.random.Generator, strength: float = 0.35) -> Image.Image:
    """A linear brightness gradient across the image plus a colour cast, like uneven room light."""
    w, h = img.size
    arr = np.asarray(img, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    xs, ys = np.meshgrid(np.linspace(-1, 1, w), np.linspace(-1, 1, h))
    ramp = 1.0 + strength * (np.cos(angle) * xs + np.sin(angle) * ys) / 2
    cast = rng.uniform(1 - strength / 3, 1 + strength / 3, size=3)
    arr = arr * ramp[..., None] * cast[None, None, :]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def background_texture(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A smooth random colour field with speckle: a table top or a wall behind the product."""
    w, h = size
    low = rng.uniform(60, 230, size=(4, 4, 3)).astype(np.float32)
    field = np.asarray(Image.fromarray(low.astype(np.uint8), "RGB").resize((w, h), Image.Resampling.BICUBIC),
                       dtype=np.float32)
    field += rng.normal(0, 12, field.shape)
    return Image.fromarray(np.clip(field, 0, 255).astype(np.uint8), "RGB")


def camera_view(img: Image.Image, rng: np.random.Generator,
                jpeg_quality: tuple[int, int] = (60, 90)) -> Image.Image:
    """Render `img` as if photographed: on a textured background, warped, lit, blurred, noisy, JPEG."""
    rgba = img.convert("RGBA")
    w, h = rgba.size
    pad = int(max(w, h) * rng.uniform(0.05, 0.35))
    canvas = background_texture((w + 2 * pad, h + 2 * pad), rng).convert("RGBA")
    canvas.alpha_composite(rgba, (pad, pad))
    out = canvas.convert("RGB")
    out = perspective(out, rng, distortion=float(rng.uniform(0.05, 0.3)),
                      fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    out = out.rotate(float(rng.uniform(-20, 20)), Image.Resampling.BILINEAR,
                     fillcolor=tuple(int(c) for c in rng.integers(0, 255, 3)))
    out = lighting(out, rng)
    out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.5))))
    out = add_noise(out, rng, float(rng.uniform(0, 8)))
    return jpeg(out, int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1)))


def scene_crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Render `img` as a loose crop out of a cluttered scene: a textured background with 3-6 random
    shapes (other objects, several of them cut by the crop edges), the product pasted at a random
    scale, and a crop box around it jittered by up to 25% of its side on each edge."""
    rgba = img.convert("RGBA")
    side = max(rgba.size)
    size = int(side * rng.uniform(2.0, 3.0))
    canvas = background_texture((size, size), rng).convert("RGBA")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.2, 0.6, 2) * side
        box = [float(x0), float(y0), float(x0 + w), float(y0 + h)]
        fill = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    scale = rng.uniform(0.6, 1.0)
    pw, ph = max(1, round(rgba.size[0] * scale)), max(1, round(rgba.size[1] * scale))
    px, py = int(rng.integers(0, size - pw)), int(rng.integers(0, size - ph))
    canvas.alpha_composite(rgba.resize((pw, ph), Image.Resampling.BILINEAR), (px, py))
    j = rng.uniform(0.0, 0.25, 4)
    box = (max(0, round(px - j[0] * pw)), max(0, round(py - j[1] * ph)),
           min(size, round(px + pw + j[2] * pw)), min(size, round(py + ph + j[3] * ph)))
    return jpeg(canvas.convert("RGB").crop(box), int(rng.integers(70, 96)))


def product_scene(img: Image.Image, others: list[Image.Image], rng: np.random.Generator,
                  size: int) -> Image.Image:
    """Render `img` in a scene of other products, as a detector's crop would show it: a textured
    canvas of 2.5 x `size` px, the `others` pasted at random places, then the product (last, so
    fully visible), each at 44 to 88% of `size`; the crop is the product's box grown by up to 15%
    of its side on each edge, so neighbours show at its margins (Shop the Look's queries)."""
    side_max = int(size * 2.5)
    canvas = background_texture((side_max, side_max), rng).convert("RGBA")
    x = y = side = 0
    for item in [*others, img]:
        side = int(rng.integers(round(0.44 * size), round(0.88 * size) + 1))
        x, y = int(rng.integers(0, side_max - side)), int(rng.integers(0, side_max - side))
        canvas.alpha_composite(item.convert("RGBA").resize((side, side), Image.Resampling.BICUBIC), (x, y))
    jitter = side * 0.15 * rng.random(4)
    box = (max(0, int(x - jitter[0])), max(0, int(y - jitter[1])),
           min(side_max, int(x + side + jitter[2])), min(side_max, int(y + side + jitter[3])))
    return jpeg(canvas.convert("RGB").crop(box), int(rng.integers(80, 96)))


def zoom_out(img: Image.Image, rng: np.random.Generator, max_pad: float = 0.35,
             fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The product smaller in the frame: each side padded by up to `max_pad` of the image's size
    (drawn per side, so the product also moves off centre). Camera photos and detector crops show
    the product with a margin; the catalogue drawings fill their frame."""
    w, h = img.size
    left, top, right, bottom = (int(round(p)) for p in rng.uniform(0, max_pad, 4) * (w, h, w, h))
    canvas = Image.new("RGB", (w + left + right, h + top + bottom), fill)
    canvas.paste(img, (left, top))
    return canvas


class TrainTransform:
    """Augment a decoded image with a per-sample seed, then apply the shared preprocessing.

    The camera level draws one of three views: 40% clean (half of them zoomed out onto the alpha
    background), 30% camera photo, 30% scene crop; then a random crop and colour jitter. The
    zoom-out and the gentler crop of the photo and scene views (most of their margin kept) are the
    v3 recipe: the v2 model lost half of its cross-artist identity precision (P@1 31.2 -> 15.0,
    scripts/invariance.py) when the query drawing was only resized and padded 5-35% with white, the
    first step of the camera rendering (docs/results.md); random crops had only ever zoomed in.
    """

    def __init__(self, spec: PreprocessSpec, level: Level = "light") -> None:
        self.spec, self.level = spec, level

    def __call__(self, img: Image.Image, seed: int) -> np.ndarray:
        if self.level == "none":
            return self.spec.to_array(img)
        rng = np.random.default_rng(seed)
        u = rng.random() if self.level == "camera" else 0.0
        crop_scale = (0.5, 1.0)
        if u < 0.4:
            rgb = self.spec.to_rgb(img)
            if self.level == "camera" and rng.random() < 0.5:
                rgb = zoom_out(rgb, rng, fill=self.spec.alpha_background)
                crop_scale = (0.8, 1.0)
        else:
            rgb = camera_view(img, rng) if u < 0.7 else scene_crop(img, rng)
            crop_scale = (0.8, 1.0)
        # No horizontal flip: mirrored products (arrows, text, logos) are other identities.
        rgb = random_resized_crop(rgb, rng, scale=crop_scale)
        rgb = color_jitter(rgb, rng)
        return self.spec.normalize(np.asarray(self.spec.resize_image(rgb), dtype=np.uint8))
