"""JSONL manifests: one image per line with its labels per task.

    {"image": "imgs/0001.png", "labels": {"identity": "1F600", "category": "smileys", "keywords": ["grin", "face"]}}

`image` is relative to the manifest's folder (or absolute). A label is a string/int (single-label
task) or a list (multi-label task); a task missing from `labels` means "no label": the image is
masked out of that task, never given a fake one. An image-folder tree (root/CLASS/*.jpg) is read
as a manifest with the folder name as the label.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from uembed.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif"}
Label = str | list[str]


class ManifestError(UserError, ValueError):
    """A manifest line or folder that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    image: Path
    labels: dict[str, Label] = field(default_factory=dict)


def _norm_label(value: object, where: str) -> Label:
    if isinstance(value, list):
        if not value:
            raise ManifestError(f"{where}: empty label list (omit the task instead)")
        return [str(v) for v in value]
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    raise ManifestError(f"{where}: a label must be a string, an integer or a list of them")


def read_manifest(path: str | Path) -> list[Record]:
    """Read a JSONL manifest, or an image-folder tree if `path` is a directory."""
    path = Path(path)
    if path.is_dir():
        return folder_manifest(path)
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}")
    base = path.parent
    records = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not JSON: {e}") from e
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise ManifestError(f"{where}: each line needs an 'image' path")
            labels = row.get("labels", {})
            if not isinstance(labels, dict):
                raise ManifestError(f"{where}: 'labels' must be a mapping of task -> label")
            image = Path(row["image"])
            records.append(
                Record(
                    image if image.is_absolute() else base / image,
                    {k: _norm_label(v, f"{where} labels.{k}") for k, v in labels.items()},
                )
            )
    if not records:
        raise ManifestError(f"{path}: no records")
    return records


def folder_manifest(root: str | Path, label_key: str = "label") -> list[Record]:
    """root/CLASS/.../*.jpg -> records labelled {label_key: CLASS}, sorted for determinism."""
    root = Path(root)
    records = [
        Record(p, {label_key: p.relative_to(root).parts[0]})
        for p in sorted(root.rglob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and len(p.relative_to(root).parts) > 1
    ]
    if not records:
        raise ManifestError(f"{root}: no images in class sub-folders")
    return records


def write_manifest(path: str | Path, records: Iterable[Record]) -> int:
    """Write records with image paths relative to the manifest's folder (`../` included), so a
    dataset folder can be moved or copied as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    n = 0
    with path.open("w") as fh:
        for r in records:
            rel = Path(os.path.relpath(r.image.resolve(), base))
            fh.write(json.dumps({"image": rel.as_posix(), "labels": r.labels}, ensure_ascii=False) + "\n")
            n += 1
    return n


class Vocabulary:
    """Class names of one task <-> contiguous ids, sorted so every rank and resume agrees."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        if len(self.index) != len(self.names):
            raise ValueError("duplicate class names")

    @classmethod
    def from_records(cls, records: Iterable[Record], key: str) -> Vocabulary:
        names: set[str] = set()
        for r in records:
            value = r.labels.get(key)
            if value is None:
                continue
            names.update(value if isinstance(value, list) else [value])
        return cls(sorted(names))

    def __len__(self) -> int:
        return len(self.names)

    def encode(self, value: Label) -> int | list[int]:
        """Unknown names raise: a training label outside the vocabulary is a bug."""
        if isinstance(value, list):
            return [self.index[v] for v in value]
        return self.index[value]
