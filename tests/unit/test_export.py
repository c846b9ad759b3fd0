"""Export to TorchScript and ONNX: parity in bounds, dynamic batch, manifest, sha256 verification."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model_export.manifest import ArtifactError, load_manifest
from model_export.onnx import ort_runner, ort_session
from model_export.parity import BOUNDS, ParityError, check_bounds, parity_figures
from model_export.torchscript import load_torchscript, torchscript_runner
from training.checkpoint import load_model
from uembed.preprocess import PreprocessSpec


def test_manifest_describes_the_model_and_its_files(tiny_artifact: Path, tiny_checkpoint: Path) -> None:
    m = load_manifest(tiny_artifact)
    assert m.embedding_dim == 32 and m.name == "tiny" and m.version.startswith("s3-")
    assert PreprocessSpec.from_dict(m.preprocess).input_size == 32
    assert set(m.files) == {"weights", "torchscript", "onnx"}
    assert m.file("onnx").info["opset"] >= 17
    assert m.file("onnx").info["input_name"] == "images" and m.file("onnx").info["output_name"] == "embeddings"
    for key in ("torchscript", "onnx"):
        figures = m.parity[key]
        assert figures["cosine_min"] >= BOUNDS["fp32"]["cosine_min"]
        assert figures["bits_agree"] >= BOUNDS["fp32"]["bits_agree"]
        assert figures["images"] >= 8 and figures["batch_sizes"] == [1, 3, 17]
    assert m.data["model"]["tasks"]["identity"] == {"head": "norm_softmax", "classes": 18}
    assert m.data["model"]["init_from"] is None  # trained from scratch, not fine-tuned
    assert m.data["model"]["init_trunk"] is None  # and no pretrained trunk


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_dynamic_batch_sizes_match_eager(fmt: str, tiny_artifact: Path, tiny_checkpoint: Path) -> None:
    m = load_manifest(tiny_artifact)
    model, _ = load_model(tiny_checkpoint)
    run = (torchscript_runner(load_torchscript(m.path("torchscript"))) if fmt == "torchscript"
           else ort_runner(ort_session(m.path("onnx"))))
    rng = np.random.default_rng(0)
    for batch in (1, 3, 17):
        x = rng.standard_normal((batch, 3, 32, 32), dtype=np.float32)
        got = run(x)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, 32)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_torchscript_loads_without_training_code(tiny_artifact: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "sys.modules['training'] = None  # importing training/ would now fail\n"
        f"m = torch.jit.load({str(load_manifest(tiny_artifact).path('torchscript'))!r})\n"
        "print(tuple(m(torch.zeros(2, 3, 32, 32)).shape))\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(2, 32)"


@pytest.mark.parametrize("victim", ["model.onnx", "model.ts", "weights.safetensors"])
def test_a_corrupted_file_is_refused(victim: str, tiny_artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "a"
    shutil.copytree(tiny_artifact, copy)
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / victim).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=re.escape(victim) + ": sha256 mismatch"):
        load_manifest(copy)
    load_manifest(copy, verify=False)  # reading without verification still works (for inspection)


def test_missing_or_foreign_manifest(tiny_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        load_manifest(tmp_path)
    copy = tmp_path / "a"
    shutil.copytree(tiny_artifact, copy)
    (copy / "model.ts").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_manifest(copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="schema_version"):
        load_manifest(copy, verify=False)


def test_parity_out_of_bounds_names_the_figure() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((20, 64)).astype(np.float32)
    noisy = ref + rng.standard_normal(ref.shape).astype(np.float32) * 0.05  # cosine ~0.999
    figures = parity_figures(ref, noisy)
    assert 0.99 < figures["cosine_min"] < 0.9999
    with pytest.raises(ParityError, match="cosine_min"):
        check_bounds("onnx", "fp32", figures)
    flipped = ref.copy()
    flipped[:, :2] *= -1  # cosine stays high but 2 of 64 bits differ everywhere
    figures = parity_figures(ref, flipped)
    with pytest.raises(ParityError, match="bits_agree"):
        check_bounds("tensorrt", "fp16", figures | {"cosine_min": 1.0})


def test_export_cli_rejects_unknown_format_and_missing_tensorrt(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from model_export.export import ExportError, ExportOptions, export_checkpoint
    from model_export.tensorrt import tensorrt_available

    with pytest.raises(ExportError, match="unknown formats"):
        export_checkpoint(tiny_checkpoint, tmp_path / "x", ExportOptions(formats=["tflite"]))
    available, why = tensorrt_available()
    if not available:
        with pytest.raises(ExportError, match="cannot build a TensorRT engine here"):
            export_checkpoint(tiny_checkpoint, tmp_path / "y", ExportOptions(formats=["tensorrt"]))
        assert why
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_ort_providers_fall_back_in_order() -> None:
    import onnxruntime as ort

    from model_export.onnx import ort_providers

    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    auto = ort_providers("auto", cache_dir="/tmp/x")
    assert auto[-1] == "CPUExecutionProvider"
    names = [p[0] if isinstance(p, tuple) else p for p in auto]
    assert set(names) <= set(ort.get_available_providers())
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            ort_providers("cuda")


@pytest.mark.parametrize("saturation", [0.0, 3.0])
def test_color_layout_model_exports_to_onnx_with_parity(tmp_path: Path, saturation: float) -> None:
    from model_export.onnx import export_onnx
    from training.config import ModelConfig
    from training.model import UnifiedEmbeddingModel

    torch.manual_seed(0)
    model = UnifiedEmbeddingModel(ModelConfig(trunk="test_resnet", embedding_dim=16, color_layout=4,
                                              saturation=saturation)).eval()
    export_onnx(model, tmp_path / "m.onnx", 32)
    run = ort_runner(ort_session(tmp_path / "m.onnx"))
    x = np.random.default_rng(1).standard_normal((5, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(x), want, atol=1e-5)


def test_trunk_provenance_names_the_file_and_its_source(tmp_path: Path) -> None:
    from model_export.export import _trunk_provenance

    assert _trunk_provenance("") is None
    weights = tmp_path / "trunk.safetensors"
    assert _trunk_provenance(str(weights)) == {"path": str(weights)}  # no sidecar: the path only
    weights.with_suffix(".json").write_text('{"source": "npm nsfwjs@4.3.0", "tensors": 260}')
    assert _trunk_provenance(str(weights)) == {"path": str(weights), "source": "npm nsfwjs@4.3.0"}

