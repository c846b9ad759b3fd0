"""ONNX Runtime: the CPU default; on a GPU its TensorRT / CUDA execution providers.

On CPU two sessions share the model: batches of several images run on `intra_op_threads`
(default 1, leaving the other cores to decoding, which is what bounds throughput under load), and
a lone image (an idle server) on `solo_intra_op_threads` (default all cores, spin-waiting between
ops), where latency is what counts. bench/serve measured both choices; see docs/service.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model_export.manifest import Manifest
from model_export.onnx import ort_providers, ort_session
from service.backends.base import Backend, BackendError
from service.config import Settings


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    max_instances = 64  # InferenceSession.run is thread-safe

    def __init__(self, manifest: Manifest, settings: Settings) -> None:
        path = manifest.path("onnx")
        device = settings.device
        try:
            cache = Path(settings.cache_dir) if settings.cache_dir else Path(manifest.root) / ".ort-cache"
            providers = ort_providers(device, cache_dir=cache)
        except RuntimeError as e:
            raise BackendError(str(e)) from e
        self.session = ort_session(path, providers=providers, intra_op_threads=settings.intra_op_threads,
                                   allow_spinning=settings.intra_op_spinning)
        active = self.session.get_providers()
        self.solo_session = self.session
        if active == ["CPUExecutionProvider"] and settings.solo_intra_op_threads != settings.intra_op_threads:
            self.solo_session = ort_session(path, providers=providers,
                                            intra_op_threads=settings.solo_intra_op_threads,
                                            allow_spinning=settings.solo_intra_op_spinning,
                                            spin_only_in_run=settings.solo_spin_only_in_run)
        self.device = "cuda" if any(p != "CPUExecutionProvider" for p in active) else "cpu"
        self.precision = "fp16" if active and active[0] == "TensorrtExecutionProvider" else "fp32"
        self.providers = active
        self.input_name = self.session.get_inputs()[0].name

    def embed(self, batch: np.ndarray, contended: bool = True) -> np.ndarray:
        session = self.session if contended else self.solo_session
        return session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def health(self) -> dict[str, object]:
        return super().health() | {"providers": self.providers}
