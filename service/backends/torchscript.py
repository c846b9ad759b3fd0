"""TorchScript: fp32 on CPU; on CUDA the fp16 variant when the artifact has one."""

from __future__ import annotations

import numpy as np
import torch

from model_export.manifest import Manifest
from model_export.torchscript import load_torchscript
from service.backends.base import Backend, BackendError
from service.config import Settings


class TorchScriptBackend(Backend):
    name = "torchscript"

    def __init__(self, manifest: Manifest, settings: Settings) -> None:
        device = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("device cuda asked for, but torch sees no CUDA GPU")
        key = "torchscript_fp16" if device == "cuda" and "torchscript_fp16" in manifest.files else "torchscript"
        if device == "cpu" and settings.intra_op_threads:
            torch.set_num_threads(settings.intra_op_threads)
        self.module = load_torchscript(manifest.path(key), device)
        self.device, self.precision = device, manifest.file(key).precision
        self.torch_device = torch.device(device)

    @torch.inference_mode()
    def embed(self, batch: np.ndarray, contended: bool = True) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.torch_device, non_blocking=True)
        return self.module(x).float().cpu().numpy()
