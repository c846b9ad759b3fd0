"""A synthetic multi-task dataset written as real encoded images, for tests and smoke runs.

Each identity is a small composition of coloured shapes; its category fixes the palette (hue),
its attributes are the shape kinds it contains (multi-label). Every identity is drawn in several
"views", each by a different "artist": shapes moved and resized a little, colours shifted,
background tinted, rotated, and saved as PNG, JPEG or WebP. The last `holdout` identities never
appear in training: their first view, photographed (`camera_view`: textured background,
perspective, lighting, blur, noise, JPEG), is the query; the other clean views are the gallery.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.config import SyntheticDataConfig
from training.data.augment import camera_view
from training.data.manifest import Record, write_manifest

SHAPES = ("circle", "square", "triangle", "diamond", "bar")
_FORMATS = (("png", "PNG", {}), ("jpg", "JPEG", {"quality": 92}), ("webp", "WEBP", {"quality": 90}))


def _identity(rng: np.random.Generator, hue: float) -> list[dict]:
    shapes = []
    for _ in range(int(rng.integers(2, 4))):
        h = (hue + rng.uniform(-0.06, 0.06)) % 1.0
        s, v = rng.uniform(0.5, 1.0), rng.uniform(0.35, 0.95)
        shapes.append({
            "kind": SHAPES[int(rng.integers(len(SHAPES)))],
            "cx": rng.uniform(0.25, 0.75), "cy": rng.uniform(0.25, 0.75),
            "r": rng.uniform(0.12, 0.3), "angle": rng.uniform(0, 180),
            "rgb": tuple(int(c * 255) for c in colorsys.hsv_to_rgb(h, s, v)),
        })
    return shapes


def _render(shapes: list[dict], size: int, rng: np.random.Generator, jitter: float) -> Image.Image:
    ss = size * 2  # draw at 2x then downsample: antialiased edges like real artwork
    bg = tuple(int(c) for c in rng.integers(215, 256, 3)) if jitter else (255, 255, 255)
    img = Image.new("RGB", (ss, ss), bg)
    draw = ImageDraw.Draw(img)
    for sh in shapes:
        cx = (sh["cx"] + rng.normal(0, 0.04 * jitter)) * ss
        cy = (sh["cy"] + rng.normal(0, 0.04 * jitter)) * ss
        r = sh["r"] * (1 + rng.normal(0, 0.08 * jitter)) * ss
        rgb = tuple(int(np.clip(c + rng.normal(0, 14 * jitter), 0, 255)) for c in sh["rgb"])
        a = np.deg2rad(sh["angle"] + rng.normal(0, 8 * jitter))
        if sh["kind"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
            continue
        if sh["kind"] == "bar":
            pts = [(-1.0, -0.3), (1.0, -0.3), (1.0, 0.3), (-1.0, 0.3)]
        elif sh["kind"] == "square":
            pts = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
        elif sh["kind"] == "triangle":
            pts = [(0.0, -1.0), (0.9, 0.7), (-0.9, 0.7)]
        else:
            pts = [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]
        rot = [(cx + r * (x * np.cos(a) - y * np.sin(a)), cy + r * (x * np.sin(a) + y * np.cos(a))) for x, y in pts]
        draw.polygon(rot, fill=rgb)
    if jitter:
        img = img.rotate(float(rng.normal(0, 6 * jitter)), Image.Resampling.BILINEAR, fillcolor=bg)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def generate_synthetic(cfg: SyntheticDataConfig) -> dict[str, Path]:
    """Write images and train/query/gallery manifests under cfg.out; returns the manifest paths."""
    if cfg.holdout >= cfg.identities or cfg.holdout < 1:
        raise ValueError("need 1 <= holdout < identities")
    if cfg.views < 2:
        raise ValueError("need at least 2 views (a query and a gallery image)")
    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    hues = rng.permutation(cfg.categories) / cfg.categories
    train, query, gallery = [], [], []
    for k in range(cfg.identities):
        category = k % cfg.categories
        shapes = _identity(rng, float(hues[category]))
        labels = {
            "identity": f"id{k:04d}",
            "category": f"cat{category:02d}",
            "attributes": sorted({s["kind"] for s in shapes}),
        }
        for v in range(cfg.views):
            view_rng = np.random.default_rng([cfg.seed, k, v])
            img = _render(shapes, cfg.image_size, view_rng, jitter=1.0 if v else 0.3)
            held_out = k >= cfg.identities - cfg.holdout
            if held_out and v == 0:
                img = camera_view(img, view_rng)
            ext, fmt, kw = _FORMATS[(k + v) % len(_FORMATS)]
            path = out / "images" / f"id{k:04d}_v{v}.{ext}"
            img.save(path, format=fmt, **kw)
            rec = Record(path, labels)
            if not held_out:
                train.append(rec)
            else:
                (query if v == 0 else gallery).append(rec)
    paths = {"train": out / "train.jsonl", "query": out / "query.jsonl", "gallery": out / "gallery.jsonl"}
    write_manifest(paths["train"], train)
    write_manifest(paths["query"], query)
    write_manifest(paths["gallery"], gallery)
    return paths


def ensure_synthetic(cfg: SyntheticDataConfig) -> dict[str, Path]:
    out = Path(cfg.out)
    paths = {n: out / f"{n}.jsonl" for n in ("train", "query", "gallery")}
    if all(p.exists() for p in paths.values()):
        return paths
    return generate_synthetic(cfg)
