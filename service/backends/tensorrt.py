"""TensorRT: the engine file of the artifact on CUDA; refuses engines built elsewhere."""

from __future__ import annotations

import numpy as np

from model_export.manifest import Manifest
from model_export.tensorrt import TensorRTError, TensorRTRunner
from service.backends.base import Backend, BackendError
from service.config import Settings


class TensorRTBackend(Backend):
    name = "tensorrt"
    device = "cuda"
    precision = "fp16"

    def __init__(self, manifest: Manifest, settings: Settings) -> None:
        if settings.device == "cpu":
            raise BackendError("the tensorrt backend runs on CUDA; use --device cuda or auto")
        entry = manifest.file("tensorrt")
        try:
            self.runner = TensorRTRunner(manifest.path("tensorrt"), entry.info)
        except TensorRTError as e:
            raise BackendError(str(e)) from e
        self.precision = entry.precision

    @property
    def max_batch_size(self) -> int:
        return self.runner.max_batch

    def embed(self, batch: np.ndarray, contended: bool = True) -> np.ndarray:
        return self.runner(batch)
