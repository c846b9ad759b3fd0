"""Class-proxy banks kept in CPU memory, subsampled per step and updated sparsely (Pinterest 2019).

A bank of M proxies (M x D) may not fit on the accelerator. Each step samples K classes that
always contain every label of the batch (as PartialFC does: batch labels first, then uniform
negatives, sorted, and labels re-indexed with searchsorted), gathers those K rows
through `F.embedding(..., sparse=True)` so the backward pass produces a sparse gradient of K rows,
and an optimizer without momentum or weight decay (plain SGD or SparseAdam) touches only them.
A step therefore costs the same in gradient and update work whatever M is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -1  # label value meaning "no label for this task" (single) or padding (multi-label)


@dataclass
class ProxySample:
    """The classes sampled for one step and the batch labels re-indexed into them."""

    index: torch.Tensor  # (K,) sorted global class ids
    labels: torch.Tensor  # same shape as the input labels, values in [0, K) or IGNORE


def sample_classes(
    labels: torch.Tensor, num_classes: int, num_sampled: int, generator: torch.Generator | None = None
) -> ProxySample:
    """Sample K classes including every label present in `labels`, and re-index the labels.

    `labels` is (B,) or (B, L) with IGNORE for missing/padding. If K is 0 or >= num_classes all
    classes are used and labels are unchanged. K is raised to the number of distinct batch labels
    if the batch holds more, so the guarantee never breaks. The other K - P classes are uniform
    without replacement among the rest, drawn by numpy's `choice(replace=False)`, which costs
    O(K) when K << M (Floyd's algorithm) where PartialFC's top-K of M random scores costs O(M).
    """
    valid = labels[labels != IGNORE]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        raise ValueError(f"label out of range [0, {num_classes}): min {int(valid.min())}, max {int(valid.max())}")
    if num_sampled <= 0 or num_sampled >= num_classes:
        return ProxySample(torch.arange(num_classes), labels.clone())
    positives = torch.unique(valid)
    need = max(num_sampled, int(positives.numel())) - int(positives.numel())
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    # need + P draws hold at least `need` classes that are not batch labels.
    drawn = np.random.default_rng(seed).choice(num_classes, size=min(num_classes, need + positives.numel()),
                                               replace=False)
    drawn_t = torch.from_numpy(drawn)
    negatives = drawn_t[~torch.isin(drawn_t, positives)][:need]
    index = torch.cat([positives, negatives]).sort().values
    remapped = labels.clone()
    mask = labels != IGNORE
    remapped[mask] = torch.searchsorted(index, labels[mask])
    return ProxySample(index, remapped)


def _label_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, class) index pairs of every valid label in (B,) or (B, L) labels."""
    labels = labels.cpu()
    if labels.ndim == 1:
        labels = labels[:, None]
    rows, cols = (labels != IGNORE).nonzero(as_tuple=True)
    return rows, labels[rows, cols]


class ProxyBank(nn.Module):
    """M x D class proxies on the CPU; `gather` returns rows whose gradient is sparse."""

    def __init__(self, num_classes: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError("a proxy bank needs at least one class")
        w = torch.randn(num_classes, dim, generator=generator)
        self.weight = nn.Parameter(F.normalize(w, dim=1))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def gather(self, index: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        rows = F.embedding(index, self.weight, sparse=True)
        return rows.to(device, non_blocking=True)

    @torch.no_grad()
    def imprint(self, labels: torch.Tensor, embeddings: torch.Tensor, rate: float) -> torch.Tensor:
        """Move each batch class's proxy toward the mean of its batch embeddings (weight imprinting,
        Qi et al. 2018, as a moving average): p <- normalize((1 - rate) p + rate mean). A sparse update
        of the rows in `labels` only; returns their class ids.

        Meant for thousands of classes with a few images each, where a class shows up in one batch
        per epoch and gradient-only proxies change a handful of times in a run. On the emoji data it
        lowered the training loss but also retrieval (docs/training.md), so configs leave it off.
        `labels` is (B,) or (B, L) with IGNORE for missing/padding; `embeddings` (B, D) on any device.
        """
        rows, cls = _label_pairs(labels)
        if cls.numel() == 0:
            return cls
        emb = F.normalize(embeddings.detach().float().cpu(), dim=1)[rows]
        classes, inverse = torch.unique(cls, return_inverse=True)
        sums = torch.zeros(classes.numel(), emb.shape[1]).index_add_(0, inverse, emb)
        w = self.weight.data
        old = F.normalize(w[classes], dim=1)
        w[classes] = F.normalize((1.0 - rate) * old + rate * F.normalize(sums, dim=1), dim=1)
        return classes

    def extra_repr(self) -> str:
        return f"num_classes={self.weight.shape[0]}, dim={self.weight.shape[1]}, device=cpu"


def make_proxy_optimizer(params: list[nn.Parameter], kind: str, lr: float) -> torch.optim.Optimizer:
    """No momentum, no weight decay: either would touch (densify) every row each step."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
    if kind == "sparse_adam":
        return torch.optim.SparseAdam(params, lr=lr)
    raise ValueError(f"unknown proxy optimizer {kind!r}")
