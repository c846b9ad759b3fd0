"""TensorRT and CUDA paths: run where CUDA and tensorrt exist, skipped with the reason otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model_export.tensorrt import tensorrt_available

TRT_OK, TRT_WHY = tensorrt_available()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none visible")
needs_trt = pytest.mark.skipif(not TRT_OK, reason=TRT_WHY or "TensorRT unavailable")


@pytest.mark.gpu
@needs_trt
def test_tensorrt_engine_parity_and_dynamic_batch(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from model_export.export import ExportOptions, export_checkpoint
    from model_export.parity import BOUNDS
    from model_export.tensorrt import Profile, TensorRTError, TensorRTRunner

    m = export_checkpoint(tiny_checkpoint, tmp_path / "a", ExportOptions(
        formats=["onnx", "tensorrt"], trt_profile=Profile(1, 8, 32), onnx_simplify="off"), log=lambda _: None)
    info = m.file("tensorrt").info
    assert info["profile"] == {"min": 1, "opt": 8, "max": 32} and info["gpu"] and info["tensorrt_version"]
    assert m.parity["tensorrt"]["cosine_min"] >= BOUNDS["fp16"]["cosine_min"]
    runner = TensorRTRunner(m.path("tensorrt"), info)
    for batch in (1, 3, 17):
        out = runner(np.zeros((batch, 3, 32, 32), dtype=np.float32))
        assert out.shape == (batch, 32)
    with pytest.raises(TensorRTError, match="outside the engine profile"):
        runner(np.zeros((33, 3, 32, 32), dtype=np.float32))
    with pytest.raises(TensorRTError, match="built with TensorRT"):
        TensorRTRunner(m.path("tensorrt"), {**info, "tensorrt_version": "0.0.0"})
    with pytest.raises(TensorRTError, match="built for"):
        TensorRTRunner(m.path("tensorrt"), {**info, "gpu": "Some Other GPU"})


@pytest.mark.gpu
@needs_cuda
def test_torchscript_fp16_variant_on_cuda(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from model_export.export import ExportOptions, export_checkpoint
    from model_export.parity import BOUNDS

    m = export_checkpoint(tiny_checkpoint, tmp_path / "a", ExportOptions(
        formats=["torchscript"], torchscript_fp16="on"), log=lambda _: None)
    assert m.file("torchscript_fp16").precision == "fp16"
    assert m.parity["torchscript_fp16"]["cosine_min"] >= BOUNDS["fp16"]["cosine_min"]
