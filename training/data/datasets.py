"""Datasets over manifests, the balanced multi-dataset batch sampler, and the collate function.

Every batch holds a fixed number of images from each dataset (Pinterest: a uniform mix); an
epoch is the number of iterations that passes once through the largest dataset, the smaller ones
cycling. All randomness comes from (seed, epoch, step, ...) so batches, and each sample's
augmentation seed, are a pure function of the step: resume and DDP ranks need no sampler state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from training.data.augment import TrainTransform
from training.data.manifest import Record, Vocabulary
from training.proxies import IGNORE
from uembed.preprocess import PreprocessSpec


@dataclass(frozen=True)
class TaskLabels:
    """What a dataset needs to know of a task to encode its labels."""

    name: str
    label_key: str
    vocab: Vocabulary
    multi_label: bool
    manifests: frozenset[str]


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers (seed, step, rank, ...): independent streams, reproducible anywhere."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class ManifestDataset(Dataset):
    """Images of one manifest with their labels encoded for every task that reads this manifest.

    Items are (image CHW float32 tensor, {task: label}) where label is an int (IGNORE if the
    image has no label for the task) or a list of ints (empty if none).
    """

    def __init__(self, records: Sequence[Record], manifest: str, tasks: Sequence[TaskLabels],
                 transform: TrainTransform | None, spec: PreprocessSpec) -> None:
        self.records = list(records)
        self.manifest = manifest
        self.tasks = [t for t in tasks if manifest in t.manifests]
        self.all_tasks = list(tasks)
        self.transform, self.spec = transform, spec
        self.labels: list[dict[str, int | list[int]]] = []
        for r in self.records:
            enc: dict[str, int | list[int]] = {}
            for t in self.tasks:
                value = r.labels.get(t.label_key)
                if value is None:
                    continue
                if isinstance(value, list) and not t.multi_label:
                    raise ValueError(f"{r.image}: task {t.name} is single-label but has a list")
                if t.multi_label and not isinstance(value, list):
                    value = [value]
                enc[t.name] = t.vocab.encode(value)
            self.labels.append(enc)

    def __len__(self) -> int:
        return len(self.records)

    def class_of(self, key: str) -> list[str | None]:
        """The raw label under `key` of every record (for m-per-class sampling)."""
        out: list[str | None] = []
        for r in self.records:
            v = r.labels.get(key)
            out.append(v if isinstance(v, str) or v is None else v[0])
        return out

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, int | list[int]]]:
        index, seed = item if isinstance(item, tuple) else (item, 0)
        path = self.records[index].image
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            arr = self.transform(im, seed) if self.transform is not None else self.spec.to_array(im)
        labels: dict[str, int | list[int]] = {}
        enc = self.labels[index]
        for t in self.all_tasks:
            labels[t.name] = enc.get(t.name, [] if t.multi_label else IGNORE)
        return torch.from_numpy(arr), labels


def collate(batch: list[tuple[torch.Tensor, dict[str, int | list[int]]]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images stacked; single labels (B,) and multi-labels (B, Lmax) padded with IGNORE."""
    images = torch.stack([b[0] for b in batch])
    labels: dict[str, torch.Tensor] = {}
    for name in batch[0][1]:
        values = [b[1][name] for b in batch]
        if isinstance(values[0], list):
            width = max(1, max(len(v) for v in values))  # type: ignore[arg-type]
            t = torch.full((len(values), width), IGNORE, dtype=torch.long)
            for i, v in enumerate(values):
                if v:
                    t[i, : len(v)] = torch.tensor(v, dtype=torch.long)  # type: ignore[arg-type]
            labels[name] = t
        else:
            labels[name] = torch.tensor(values, dtype=torch.long)
    return images, labels


class MixedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields batches of (global index, augmentation seed) mixing every dataset evenly.

    `sizes[i]` images in dataset i (offset in the concatenation by the sum of earlier sizes),
    `per_batch[i]` taken from it each step on each rank. With `classes[i]` (class of each image)
    and `m_per_class[i]` > 0, dataset i contributes per_batch[i] / m classes x m images each.
    """

    def __init__(self, sizes: Sequence[int], per_batch: Sequence[int], seed: int = 0, *,
                 rank: int = 0, world_size: int = 1,
                 classes: Sequence[Sequence[str | None] | None] | None = None,
                 m_per_class: Sequence[int] | None = None) -> None:
        if len(sizes) != len(per_batch) or not sizes:
            raise ValueError("one per_batch count per dataset")
        if min(sizes) < 1 or min(per_batch) < 1:
            raise ValueError("every dataset needs images and a per-batch count >= 1")
        self.sizes, self.per_batch = list(sizes), list(per_batch)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.m = list(m_per_class or [0] * len(sizes))
        self.groups: list[list[np.ndarray] | None] = []
        for i, cls in enumerate(classes or [None] * len(sizes)):
            if self.m[i] > 0:
                if cls is None:
                    raise ValueError(f"dataset {i}: m_per_class needs the class of each image")
                if self.per_batch[i] % self.m[i]:
                    raise ValueError(f"dataset {i}: per-batch count {self.per_batch[i]} not a multiple of m={self.m[i]}")
                by_class: dict[str, list[int]] = {}
                for j, c in enumerate(cls):
                    if c is not None:
                        by_class.setdefault(c, []).append(j)
                self.groups.append([np.asarray(v) for _, v in sorted(by_class.items())])
            else:
                self.groups.append(None)
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        """Steps per epoch: one pass through the largest dataset (per rank share)."""
        return max(math.ceil(n / (b * self.world_size)) for n, b in zip(self.sizes, self.per_batch, strict=True))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _stream(self, ds: int, start: int, count: int) -> np.ndarray:
        """Positions [start, start+count) of dataset ds's endless stream of seeded permutations."""
        n = self.sizes[ds]
        out = np.empty(count, dtype=np.int64)
        pos, filled = start, 0
        while filled < count:
            perm = np.random.default_rng(derive_seed(self.seed, ds, pos // n)).permutation(n)
            take = min(count - filled, n - pos % n)
            out[filled : filled + take] = perm[pos % n : pos % n + take]
            filled, pos = filled + take, pos + take
        return out

    def _m_per_class(self, ds: int, step: int) -> np.ndarray:
        groups = self.groups[ds]
        assert groups is not None
        m = self.m[ds]
        n_cls = self.per_batch[ds] // m
        rng = np.random.default_rng(derive_seed(self.seed, ds, step, self.rank, 7))
        chosen = rng.choice(len(groups), size=n_cls, replace=len(groups) < n_cls)
        picks = [rng.choice(groups[c], size=m, replace=len(groups[c]) < m) for c in chosen]
        return np.concatenate(picks)

    def batch(self, step: int) -> list[tuple[int, int]]:
        """The batch of global step `step` for this rank (pure function of seed, step, rank)."""
        items: list[tuple[int, int]] = []
        for ds, b in enumerate(self.per_batch):
            if self.groups[ds] is not None:
                local = self._m_per_class(ds, step)
            else:
                start = (step * self.world_size + self.rank) * b
                local = self._stream(ds, start, b)
            for j, idx in enumerate(local):
                items.append((int(self.offsets[ds] + idx), derive_seed(self.seed, step, self.rank, ds, j)))
        return items

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        steps = len(self)
        for s in range(self.start_step, steps):
            yield self.batch(self.epoch * steps + s)


class IndexedConcat(Dataset):
    """Concatenation that passes (index, seed) items through to the owning dataset."""

    def __init__(self, datasets: Sequence[ManifestDataset]) -> None:
        self.datasets = list(datasets)
        self.ends = np.cumsum([len(d) for d in self.datasets])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, dict[str, int | list[int]]]:
        index, seed = item
        ds = int(np.searchsorted(self.ends, index, side="right"))
        start = 0 if ds == 0 else int(self.ends[ds - 1])
        return self.datasets[ds][(index - start, seed)]
