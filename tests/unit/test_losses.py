"""Each loss against a value computed by hand (plain math, no torch functional)."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    ArcFaceLoss,
    DoubleMarginLoss,
    MultiLabelArcFaceLoss,
    MultiLabelSoftmaxLoss,
    MultipleLosses,
    NormSoftmaxLoss,
    cosine_to_proxies,
)
from training.proxies import IGNORE


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def test_norm_softmax_matches_hand_value() -> None:
    cos = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, 0.9]])
    labels = torch.tensor([0, 1])
    expected = (ce([10.0, -4.0, 2.0], 0) + ce([0.0, 6.0, 18.0], 1)) / 2  # cos / 0.05
    assert NormSoftmaxLoss(0.05)(cos, labels).item() == pytest.approx(expected, rel=1e-5)


def test_arcface_adds_angular_margin_to_the_target_only() -> None:
    cos = torch.tensor([[0.6, 0.3]])
    target = math.cos(math.acos(0.6) + 0.5)
    expected = ce([10 * target, 10 * 0.3], 0)
    assert ArcFaceLoss(margin=0.5, scale=10.0)(cos, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-5)


def test_arcface_past_pi_uses_the_linear_continuation() -> None:
    # theta + m > pi: cos(theta + m) would rise again; InsightFace uses cos - m*sin(m) instead.
    cos = torch.tensor([[-0.95, 0.1]])
    target = -0.95 - math.sin(math.pi - 0.5) * 0.5
    expected = ce([4 * target, 4 * 0.1], 0)
    assert ArcFaceLoss(margin=0.5, scale=4.0)(cos, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-5)


def test_multilabel_softmax_uniform_target_over_positives() -> None:
    cos = torch.tensor([[0.2, 0.4, -0.1]])
    labels = torch.tensor([[0, 1, IGNORE]])
    logits = [2.0, 4.0, -1.0]  # cos / 0.1
    z = math.log(sum(math.exp(v) for v in logits))
    expected = -0.5 * (logits[0] - z) - 0.5 * (logits[1] - z)
    assert MultiLabelSoftmaxLoss(0.1)(cos, labels).item() == pytest.approx(expected, rel=1e-5)


def test_multilabel_arcface_margin_on_every_positive() -> None:
    cos = torch.tensor([[0.2, 0.4, -0.1]])
    labels = torch.tensor([[1, 0]])
    s, m = 8.0, 0.3
    logits = [s * math.cos(math.acos(0.2) + m), s * math.cos(math.acos(0.4) + m), s * -0.1]
    z = math.log(sum(math.exp(v) for v in logits))
    expected = -0.5 * (logits[0] - z) - 0.5 * (logits[1] - z)
    assert MultiLabelArcFaceLoss(m, s)(cos, labels).item() == pytest.approx(expected, rel=1e-5)


def test_double_margin_balances_positive_and_negative_pairs() -> None:
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1])
    # pairs: (0,1) positive cos .6; (0,2) negative cos .8; (1,2) negative cos .96
    expected = max(0.0, 0.8 - 0.6) + (max(0.0, 0.8 - 0.3) + max(0.0, 0.96 - 0.3)) / 2
    assert DoubleMarginLoss(0.8, 0.3)(emb, labels).item() == pytest.approx(expected, rel=1e-5)


def test_double_margin_without_positive_pairs_still_has_a_graph() -> None:
    emb = torch.nn.functional.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    loss = DoubleMarginLoss(0.8, 1.0)(emb, torch.tensor([0, 1, 2]))  # no positives, no violating negatives
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None


def test_multiple_losses_weighted_sum_by_name() -> None:
    combine = MultipleLosses({"a": 1.0, "b": 0.5})
    assert combine({"a": torch.tensor(2.0), "b": torch.tensor(4.0)}).item() == 4.0
    assert combine({"b": torch.tensor(4.0)}).item() == 2.0  # a task absent from the batch
    with pytest.raises(KeyError, match="unknown"):
        combine({"c": torch.tensor(1.0)})


def test_cosine_to_proxies_normalizes_proxies() -> None:
    emb = torch.tensor([[1.0, 0.0]])
    proxies = torch.tensor([[3.0, 0.0], [0.0, -2.0], [1.0, 1.0]])
    assert torch.allclose(cosine_to_proxies(emb, proxies), torch.tensor([[1.0, 0.0, math.sqrt(0.5)]]))


@pytest.mark.parametrize("loss", [NormSoftmaxLoss(), ArcFaceLoss()])
def test_single_label_losses_reject_bad_shapes_and_labels(loss: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="expected"):
        loss(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, K\)"):
        loss(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_multilabel_rejects_rows_without_labels() -> None:
    with pytest.raises(ValueError, match="at least one label"):
        MultiLabelSoftmaxLoss()(torch.zeros(2, 3), torch.tensor([[0, 1], [IGNORE, IGNORE]]))
