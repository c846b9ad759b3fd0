"""TorchScript export: a traced, frozen module (normalized NCHW float32 batch -> L2-normalized embeddings).

The saved file loads with `torch.jit.load` alone, without any code of `training/`. The fp16
variant (CUDA only) runs the trunk in half precision and keeps GeM pooling and the embedding
head in float32 (x**p overflows fp16); it still takes and returns float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


@contextmanager
def _quiet_jit() -> Iterator[None]:
    # torch >= 2.9 marks the TorchScript API deprecated (FutureWarning on every call). TorchScript
    # is still the format GPU serving stacks load without Python model code, so we keep it and
    # silence only those warnings, only here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


class _HalfTrunk(nn.Module):
    """fp16 trunk, fp32 pooling and head; float32 in and out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.model.trunk.half()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.half())


def export_torchscript(model: nn.Module, path: Path, input_size: int, *, fp16: bool = False,
                       device: str = "cpu") -> Path:
    """Trace `model` (eval mode) with a batch of 2, freeze it and save it to `path`."""
    model = model.eval().to(device)
    module: nn.Module = _HalfTrunk(model) if fp16 else model
    example = torch.randn(2, 3, input_size, input_size, device=device)
    with torch.no_grad(), _quiet_jit():
        traced = torch.jit.trace(module, example, check_trace=False)
        frozen = torch.jit.freeze(traced)
        torch.jit.save(frozen, str(path))
    return path


def load_torchscript(path: Path, device: str = "cpu") -> torch.jit.ScriptModule:
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location=device)
    return module.eval()


def torchscript_runner(module: torch.jit.ScriptModule, device: str = "cpu"):
    """numpy (N, 3, S, S) float32 -> numpy (N, D) float32."""

    @torch.no_grad()
    def run(batch):
        return module(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return run
