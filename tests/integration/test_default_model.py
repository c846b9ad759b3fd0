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
