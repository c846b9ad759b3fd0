"""Proxy subsampling keeps every batch label and re-indexes it; updates touch only sampled rows."""

from __future__ import annotations

import pytest
import torch

from training.losses import NormSoftmaxLoss, cosine_to_proxies
from training.proxies import IGNORE, ProxyBank, make_proxy_optimizer, sample_classes


@pytest.mark.parametrize("seed", range(20))
def test_sample_always_holds_batch_labels_and_reindexes(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 1000, (64,), generator=g)
    labels[::7] = IGNORE
    s = sample_classes(labels, 1000, 100, g)
    assert s.index.shape == (100,)
    assert torch.equal(s.index, torch.unique(s.index))  # sorted, no duplicates
    valid = labels != IGNORE
    assert torch.equal(s.index[s.labels[valid]], labels[valid])  # remap points back to the label
    assert torch.equal(s.labels[~valid], labels[~valid])  # missing labels stay missing


def test_multilabel_sampling_and_k_grows_when_batch_has_more_labels() -> None:
    labels = torch.tensor([[5, 9, IGNORE], [1, 2, 3], [7, IGNORE, IGNORE]])
    s = sample_classes(labels, 50, 4, torch.Generator().manual_seed(0))
    assert s.index.numel() == 6  # 6 distinct positives > K=4: all of them, never fewer
    valid = labels != IGNORE
    assert torch.equal(s.index[s.labels[valid]], labels[valid])
    assert bool((s.labels[~valid] == IGNORE).all())


def test_no_sampling_when_k_covers_all_classes() -> None:
    labels = torch.tensor([3, 1])
    s = sample_classes(labels, 10, 0)
    assert torch.equal(s.index, torch.arange(10)) and torch.equal(s.labels, labels)


def test_out_of_range_label_is_an_error() -> None:
    with pytest.raises(ValueError, match="out of range"):
        sample_classes(torch.tensor([10]), 10, 4)


def test_sampled_negatives_are_spread_over_all_classes() -> None:
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(200)
    for _ in range(400):
        counts[sample_classes(torch.tensor([0]), 200, 21, g).index] += 1
    # class 0 always; every other class about 20/199 of the time
    assert counts[0] == 400
    others = counts[1:] / 400
    assert float(others.min()) > 0.05 and float(others.max()) < 0.17


@pytest.mark.parametrize("kind", ["sgd", "sparse_adam"])
def test_a_step_changes_only_the_sampled_rows(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    bank = ProxyBank(1000, 16, g)
    opt = make_proxy_optimizer(list(bank.parameters()), kind, lr=0.5)
    before = bank.weight.detach().clone()
    labels = torch.tensor([3, 500, 3, 999])
    s = sample_classes(labels, 1000, 32, g)
    emb = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    loss = NormSoftmaxLoss()(cosine_to_proxies(emb, bank.gather(s.index, "cpu")), s.labels)
    loss.backward()
    assert bank.weight.grad is not None and bank.weight.grad.is_sparse
    opt.step()
    changed = (bank.weight.detach() != before).any(dim=1).nonzero().flatten()
    assert torch.equal(changed, s.index)  # exactly the sampled rows, the batch labels among them
    assert {3, 500, 999} <= set(changed.tolist())


def test_large_bank_sampling_is_exact_and_unique() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 1_000_000, (256,), generator=g)
    s = sample_classes(labels, 1_000_000, 4096, g)
    assert s.index.numel() == 4096 and torch.equal(s.index, torch.unique(s.index))
    assert torch.equal(s.index[s.labels], labels)
    # negatives reach the whole range, not only low ids
    assert int(s.index.max()) > 900_000 and int(s.index.min()) < 100_000


def test_imprint_moves_only_batch_classes_toward_their_mean() -> None:
    bank = ProxyBank(10, 4, torch.Generator().manual_seed(0))
    before = bank.weight.detach().clone()
    emb = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 3.0, 0]])
    labels = torch.tensor([2, 2, 7])
    touched = bank.imprint(labels, emb, rate=1.0)
    assert touched.tolist() == [2, 7]
    w = bank.weight.detach()
    torch.testing.assert_close(w[2], torch.tensor([1.0, 1.0, 0, 0]) / 2**0.5)
    torch.testing.assert_close(w[7], torch.tensor([0, 0, 1.0, 0]))
    untouched = [i for i in range(10) if i not in (2, 7)]
    assert torch.equal(w[untouched], before[untouched])


def test_imprint_rate_blends_and_multilabel_padding_is_ignored() -> None:
    bank = ProxyBank(5, 3, torch.Generator().manual_seed(1))
    old = torch.nn.functional.normalize(bank.weight.detach()[[1, 4]].clone(), dim=1)
    emb = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 5.0]])
    labels = torch.tensor([[1, IGNORE], [1, 4]])  # class 1 in both rows, class 4 in the second
    assert bank.imprint(labels, emb, rate=0.5).tolist() == [1, 4]
    want = torch.nn.functional.normalize(0.5 * old + 0.5 * torch.tensor([0.0, 0.0, 1.0]), dim=1)
    torch.testing.assert_close(bank.weight.detach()[[1, 4]], want)
    assert bank.imprint(torch.full((2,), IGNORE), emb, rate=0.5).numel() == 0
