"""Regenerate loadtest/photos/: real photos that PyPI packages ship, resized to mixed sizes.

    .venv/bin/python loadtest/make_photos.py

Fetches the scikit-image and scikit-learn wheels with `pip download` (the package registry; nothing
else), reads the photos bundled in them (skimage/data, sklearn/datasets/images), and writes JPEGs
whose long side is up to 1000, 640, 320 or 160 px (never upscaled), so the load test exercises JPEG
draft decoding of large uploads as well as small ones; two of them also as HEIC and AVIF, what phones
and browsers upload besides JPEG. Origins and licences: loadtest/photos/SOURCES.md.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pillow_heif
from PIL import Image

pillow_heif.register_heif_opener()

PACKAGES = ["scikit-image==0.26.0", "scikit-learn==1.9.1"]
# (file inside the wheel, long side in px)
PHOTOS = [
    ("skimage/data/astronaut.png", 512), ("skimage/data/chelsea.png", 640), ("skimage/data/coffee.png", 640),
    ("skimage/data/rocket.jpg", 320), ("skimage/data/gravel.png", 160), ("skimage/data/retina.jpg", 320),
    ("skimage/data/hubble_deep_field.jpg", 1000), ("skimage/data/camera.png", 320), ("skimage/data/brick.png", 160),
    ("skimage/data/grass.png", 160), ("sklearn/datasets/images/china.jpg", 640),
    ("sklearn/datasets/images/flower.jpg", 640),
]
# Also written in these formats (pillow-heif registers HEIF with Pillow; AVIF is Pillow's own).
ALSO = {"skimage/data/coffee.png": "heic", "sklearn/datasets/images/china.jpg": "avif"}
OUT = Path(__file__).resolve().parent / "photos"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp,
                        *PACKAGES], check=True)
        wheels = [zipfile.ZipFile(w) for w in Path(tmp).glob("*.whl")]
        OUT.mkdir(exist_ok=True)
        for member, side in PHOTOS:
            wheel = next(w for w in wheels if member in w.namelist())
            with Image.open(io.BytesIO(wheel.read(member))) as im:
                img = im.convert("RGB")
            scale = min(1.0, side / max(img.size))  # never upscale
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.LANCZOS)
            path = OUT / f"{Path(member).stem}_{img.width}x{img.height}.jpg"
            img.save(path, quality=85, optimize=True)
            print(f"{path.relative_to(OUT.parent.parent)}  {path.stat().st_size // 1024} KiB")
            if member in ALSO:
                path = path.with_suffix("." + ALSO[member])
                img.save(path, format="HEIF" if path.suffix == ".heic" else "AVIF", quality=60)
                print(f"{path.relative_to(OUT.parent.parent)}  {path.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
