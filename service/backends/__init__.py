"""Inference backends, chosen by name; heavy imports happen only for the one selected."""

from __future__ import annotations

import importlib

from model_export.manifest import Manifest
from service.backends.base import Backend, BackendError
from service.config import Settings

BACKENDS = {
    "onnxruntime": ("service.backends.onnxruntime", "OnnxRuntimeBackend", "uembed[serve]"),
    "torchscript": ("service.backends.torchscript", "TorchScriptBackend", "uembed[train]  (torch)"),
    "tensorrt": ("service.backends.tensorrt", "TensorRTBackend", "uembed[tensorrt]  (and torch with CUDA)"),
}


def load_backend(name: str, manifest: Manifest, settings: Settings) -> Backend:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    module, cls, extra = BACKENDS[name]
    try:
        backend_cls = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise BackendError(f"backend {name} needs packages that are not installed ({e.name}): "
                           f"pip install '{extra}'") from e
    return backend_cls(manifest, settings)


__all__ = ["BACKENDS", "Backend", "BackendError", "load_backend"]
