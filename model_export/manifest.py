"""The artifact manifest: the only thing that crosses from export to serving.

Standard library only, so the service can read and verify an artifact without torch. Layout of
an artifact directory:

    manifest.json       this schema (see `Manifest`)
    weights.safetensors the embedding model's weights (provenance: their sha256 names the model)
    model.ts            TorchScript, fp32 (CPU or CUDA)       [optional]
    model.fp16.ts       TorchScript, fp16 (CUDA)              [optional]
    model.onnx          ONNX, fp32 (ONNX Runtime)             [optional]
    model.plan          TensorRT engine, fp16 (one GPU model) [optional]

Every file is listed with its sha256; `load_manifest(..., verify=True)` refuses an artifact whose
files do not match, naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uembed.errors import UserError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ArtifactError(UserError):
    """An artifact directory that cannot be served: missing, corrupted or incompatible."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ArtifactFile:
    key: str  # weights | torchscript | torchscript_fp16 | onnx | tensorrt
    path: str  # relative to the artifact directory
    format: str
    precision: str
    sha256: str
    info: dict[str, Any]  # format-specific: opset and tensor names, TensorRT version and GPU, ...


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.data["model"]["name"])

    @property
    def version(self) -> str:
        return str(self.data["model"]["version"])

    @property
    def embedding_dim(self) -> int:
        return int(self.data["model"]["embedding_dim"])

    @property
    def preprocess(self) -> dict[str, Any]:
        return dict(self.data["preprocess"])

    @property
    def weights_sha256(self) -> str:
        return self.files["weights"].sha256

    @property
    def parity(self) -> dict[str, Any]:
        return dict(self.data.get("parity", {}))

    @property
    def files(self) -> dict[str, ArtifactFile]:
        return {
            key: ArtifactFile(key, f["path"], f["format"], f["precision"], f["sha256"],
                              {k: v for k, v in f.items() if k not in ("path", "format", "precision", "sha256")})
            for key, f in self.data["files"].items()
        }

    def file(self, key: str) -> ArtifactFile:
        files = self.files
        if key not in files:
            raise ArtifactError(f"{self.root}: the artifact has no '{key}' file (it has: {', '.join(sorted(files))})")
        return files[key]

    def path(self, key: str) -> Path:
        return self.root / self.file(key).path

    def verify(self, keys: list[str] | None = None) -> None:
        """Check the sha256 of the listed files (all by default); raise naming the first mismatch."""
        for key in keys or list(self.files):
            f = self.file(key)
            path = self.root / f.path
            if not path.is_file():
                raise ArtifactError(f"{path}: listed in the manifest but missing")
            actual = sha256_file(path)
            if actual != f.sha256:
                raise ArtifactError(
                    f"{path}: sha256 mismatch (manifest {f.sha256[:12]}..., file {actual[:12]}...): "
                    "the file was modified or corrupted; re-export the artifact")


def load_manifest(root: str | Path, verify: bool | list[str] = True) -> Manifest:
    """Read DIR/manifest.json; verify every file's sha256 (or only the keys given)."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST_NAME} (is this an artifact directory from `uembed export`?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON: {e}") from e
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: schema_version {version!r}, this uembed reads {SCHEMA_VERSION}")
    for key in ("model", "preprocess", "files"):
        if key not in data:
            raise ArtifactError(f"{path}: missing '{key}'")
    manifest = Manifest(root, data)
    if "weights" not in data["files"]:
        raise ArtifactError(f"{path}: no 'weights' file entry")
    if verify:
        manifest.verify(verify if isinstance(verify, list) else None)
    return manifest


def file_entry(root: Path, path: Path, fmt: str, precision: str, **info: Any) -> dict[str, Any]:
    return {"path": path.relative_to(root).as_posix(), "format": fmt, "precision": precision,
            "sha256": sha256_file(path), **info}


def write_manifest(root: Path, data: dict[str, Any]) -> Path:
    out = root / MANIFEST_NAME
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps({"schema_version": SCHEMA_VERSION, **data}, indent=2, sort_keys=False))
    tmp.rename(out)
    return out
