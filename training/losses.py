"""Task losses. Each class follows the same sequence: check shapes, compute per-sample, reduce (mean).

Proxy losses take `cosine` (N, K): cosines between L2-normalized embeddings and the K sampled,
L2-normalized proxies, and labels re-indexed into [0, K) (IGNORE pads multi-label rows).
`MultipleLosses` combines tasks by name with named weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.proxies import IGNORE


def cosine_to_proxies(embeddings: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    """(N, D) embeddings (already L2-normalized) x (K, D) proxies -> (N, K) cosines."""
    return embeddings @ F.normalize(proxies.to(embeddings.dtype), dim=1).t()


def _check_single(cosine: torch.Tensor, labels: torch.Tensor) -> None:
    if cosine.ndim != 2 or labels.ndim != 1 or labels.shape[0] != cosine.shape[0]:
        raise ValueError(f"expected cosine (N, K) and labels (N,), got {tuple(cosine.shape)}, {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cosine.shape[1]):
        raise ValueError("labels must lie in [0, K); mask unlabeled rows out before the loss")


def _check_multi(cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label (N, L) padded with IGNORE -> (N, K) target mask; each row needs >= 1 label."""
    if cosine.ndim != 2 or labels.ndim != 2 or labels.shape[0] != cosine.shape[0]:
        raise ValueError(f"expected cosine (N, K) and labels (N, L), got {tuple(cosine.shape)}, {tuple(labels.shape)}")
    valid = labels != IGNORE
    if not bool(valid.any(dim=1).all()):
        raise ValueError("every row of a multi-label batch needs at least one label")
    if int(labels[valid].max()) >= cosine.shape[1] or int(labels[valid].min()) < 0:
        raise ValueError("labels must lie in [0, K)")
    target = torch.zeros_like(cosine, dtype=torch.bool)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
    target[rows[valid], labels[valid]] = True
    return target


def _soft_target_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a uniform distribution over each row's positives (per-sample)."""
    weights = target.float() / target.sum(dim=1, keepdim=True)
    return -(weights * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


def _arc_margin(cosine: torch.Tensor, margin: float) -> torch.Tensor:
    """cos(theta + m), continued as cos(theta) - m sin(m) where theta + m would pass pi (InsightFace)."""
    cos = cosine.float().clamp(-1.0, 1.0)
    sin = torch.sqrt((1.0 - cos * cos).clamp(min=0.0))
    phi = cos * math.cos(margin) - sin * math.sin(margin)
    threshold = math.cos(math.pi - margin)
    return torch.where(cos > threshold, phi, cos - math.sin(math.pi - margin) * margin)


class NormSoftmaxLoss(nn.Module):
    """Normalized softmax: cross-entropy over cosine / temperature, no bias (Zhai & Wu 2019)."""

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_single(cosine, labels)
        per_sample = F.cross_entropy(cosine.float() / self.temperature, labels, reduction="none")
        return per_sample.mean()


class ArcFaceLoss(nn.Module):
    """Additive angular margin: the target logit is s * cos(theta + m) (Deng et al. 2019)."""

    def __init__(self, margin: float = 0.5, scale: float = 64.0) -> None:
        super().__init__()
        self.margin, self.scale = margin, scale

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_single(cosine, labels)
        target = F.one_hot(labels, cosine.shape[1]).bool()
        logits = torch.where(target, _arc_margin(cosine, self.margin), cosine.float()) * self.scale
        per_sample = F.cross_entropy(logits, labels, reduction="none")
        return per_sample.mean()


class MultiLabelSoftmaxLoss(nn.Module):
    """Softmax cross-entropy against a uniform target over the image's labels (GrokNet, Mahajan 2018)."""

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = _check_multi(cosine, labels)
        per_sample = _soft_target_ce(cosine.float() / self.temperature, target)
        return per_sample.mean()


class MultiLabelArcFaceLoss(nn.Module):
    """ArcFace with several positives: every positive logit gets the angular margin, uniform target."""

    def __init__(self, margin: float = 0.5, scale: float = 64.0) -> None:
        super().__init__()
        self.margin, self.scale = margin, scale

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = _check_multi(cosine, labels)
        logits = torch.where(target, _arc_margin(cosine, self.margin), cosine.float()) * self.scale
        per_sample = _soft_target_ce(logits, target)
        return per_sample.mean()


class DoubleMarginLoss(nn.Module):
    """Pairwise double margin on in-batch pairs (GrokNet): y*relu(m_pos - cos) + (1-y)*relu(cos - m_neg).

    Positive and negative pairs are averaged separately and summed, so the many negatives of a
    batch do not drown the few positives. A batch without positive (or negative) pairs contributes
    zero for that half.
    """

    def __init__(self, pos_margin: float = 0.8, neg_margin: float = 0.3) -> None:
        super().__init__()
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim != 2 or labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"expected embeddings (N, D) and labels (N,), got {tuple(embeddings.shape)}")
        emb = embeddings.float()
        cos = emb @ emb.t()
        n = emb.shape[0]
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=emb.device), diagonal=1)
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        pos, neg = same & upper, ~same & upper
        zero = emb.sum() * 0.0  # keeps the graph (and dtype/device) when a half is empty
        pos_loss = F.relu(self.pos_margin - cos[pos]).mean() if bool(pos.any()) else zero
        neg_loss = F.relu(cos[neg] - self.neg_margin).mean() if bool(neg.any()) else zero
        return pos_loss + neg_loss


class MultipleLosses(nn.Module):
    """Tasks combined by name: total = sum(weight[name] * loss[name]) over the tasks present."""

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__()
        self.weights = dict(weights)

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        unknown = set(losses) - set(self.weights)
        if unknown:
            raise KeyError(f"losses for unknown tasks: {sorted(unknown)}")
        if not losses:
            raise ValueError("no task produced a loss for this batch")
        return sum(self.weights[name] * value for name, value in losses.items())  # type: ignore[return-value]


def build_proxy_loss(head: str, *, temperature: float, margin: float, scale: float) -> nn.Module:
    if head == "norm_softmax":
        return NormSoftmaxLoss(temperature)
    if head == "arcface":
        return ArcFaceLoss(margin, scale)
    if head == "multilabel_softmax":
        return MultiLabelSoftmaxLoss(temperature)
    if head == "multilabel_arcface":
        return MultiLabelArcFaceLoss(margin, scale)
    raise ValueError(f"{head!r} is not a proxy head")
