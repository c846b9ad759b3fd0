"""The shipped default artifact: intact (sha256), and served by `Settings()` defaults."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from model_export.manifest import load_manifest
from service.app import create_app
from service.config import Settings
from tests.service_helpers import ServerThread, photo

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_artifact_verifies_and_passed_parity() -> None:
    m = load_manifest(ROOT / "models" / "default")  # verifies every file's sha256
    assert m.embedding_dim == 256 and {"weights", "onnx"} <= set(m.files)
    assert m.parity["onnx"]["cosine_min"] >= 0.9999
    assert sum(f.stat().st_size for f in (ROOT / "models" / "default").iterdir()) < 30 * 2**20


def test_default_settings_serve_the_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the default --model is the relative path models/default
    with ServerThread(create_app(Settings())) as server:
        resp = httpx.post(f"{server.url}/embed", content=photo(1, size=(640, 480)))
        info = httpx.get(f"{server.url}/v1/model").json()
    assert resp.status_code == 200, resp.text
    vec = np.array(resp.json()["embeddings"][0]["float"])
    assert vec.shape == (256,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    assert info["backend"]["backend"] == "onnxruntime" and info["backend"]["device"] == "cpu"


def test_default_model_matches_a_photo_to_its_own_recompressed_copy() -> None:
    """Real photos (loadtest/photos): each one, re-encoded smaller at JPEG quality 60, is nearest to
    its own original among all of them, and the binary codes agree."""
    import io

    from PIL import Image

    from model_export.onnx import ort_session
    from service.decode import DecodeLimits, decode_image
    from uembed.preprocess import PreprocessSpec

    m = load_manifest(ROOT / "models" / "default", verify=False)
    spec = PreprocessSpec.from_dict(m.preprocess)
    session = ort_session(m.path("onnx"))
    limits = DecodeLimits(16 << 20, 50_000_000)
    photos = sorted((ROOT / "loadtest" / "photos").glob("*.jpg"))
    originals, copies = [], []
    for path in photos:
        data = path.read_bytes()
        originals.append(decode_image(data, spec, limits))
        with Image.open(io.BytesIO(data)) as im:
            small = im.convert("RGB").resize((im.width * 3 // 4, im.height * 3 // 4))
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=60)
        copies.append(decode_image(buf.getvalue(), spec, limits))
    name = session.get_inputs()[0].name
    a = session.run(None, {name: np.stack(originals)})[0]
    b = session.run(None, {name: np.stack(copies)})[0]
    assert len(photos) >= 10
    assert (np.argmax(b @ a.T, axis=1) == np.arange(len(photos))).all()
    hamming = ((b[:, None, :] > 0) != (a[None, :, :] > 0)).sum(-1)
    assert (np.argmin(hamming, axis=1) == np.arange(len(photos))).all()


def test_default_model_finds_the_jpeg_of_a_phone_format_upload() -> None:
    """loadtest/photos' HEIC and AVIF files are the same pictures as two of its JPEGs: through the
    service's decoder and the shipped model, each is nearest (float and binary) to its own JPEG."""
    from model_export.onnx import ort_session
    from service.decode import DecodeLimits, decode_image
    from uembed.preprocess import PreprocessSpec

    m = load_manifest(ROOT / "models" / "default", verify=False)
    spec = PreprocessSpec.from_dict(m.preprocess)
    session = ort_session(m.path("onnx"))
    limits = DecodeLimits(16 << 20, 50_000_000)
    folder = ROOT / "loadtest" / "photos"
    jpegs = sorted(folder.glob("*.jpg"))
    others = sorted([*folder.glob("*.heic"), *folder.glob("*.avif")])
    assert {p.suffix for p in others} == {".heic", ".avif"}
    name = session.get_inputs()[0].name

    def embed(paths: list[Path]) -> np.ndarray:
        return session.run(None, {name: np.stack([decode_image(p.read_bytes(), spec, limits) for p in paths])})[0]

    a, b = embed(jpegs), embed(others)
    own = [[j.stem for j in jpegs].index(o.stem) for o in others]
    assert (np.argmax(b @ a.T, axis=1) == own).all()
    hamming = ((b[:, None, :] > 0) != (a[None, :, :] > 0)).sum(-1)
    assert (np.argmin(hamming, axis=1) == own).all()
