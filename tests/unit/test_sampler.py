"""The balanced multi-dataset batch sampler: uniform mix, epoch length, coverage, ranks, m-per-class."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from training.data.datasets import MixedBatchSampler


def _dataset_of(index: int, sizes: list[int]) -> int:
    return int(np.searchsorted(np.cumsum(sizes), index, side="right"))


def test_every_batch_has_the_fixed_count_from_each_dataset() -> None:
    sizes, per = [10, 37, 5], [2, 3, 1]
    s = MixedBatchSampler(sizes, per, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == math.ceil(37 / 3)  # one pass through the largest dataset
    for b in batches:
        counts = Counter(_dataset_of(i, sizes) for i, _ in b)
        assert counts == {0: 2, 1: 3, 2: 1}


def test_largest_dataset_is_seen_once_per_epoch_and_smaller_ones_cycle() -> None:
    sizes, per = [6, 40], [2, 4]
    s = MixedBatchSampler(sizes, per, seed=1)
    batches = list(s)
    big = [i - 6 for b in batches for i, _ in b if i >= 6]
    assert sorted(big) == list(range(40))
    small = [i for b in batches for i, _ in b if i < 6]
    assert len(small) == 20 and Counter(small).most_common(1)[0][1] <= math.ceil(20 / 6) + 1
    # each pass through the small dataset is a full permutation
    assert sorted(small[:6]) == list(range(6))


def test_epochs_differ_and_resume_mid_epoch_gives_the_same_batches() -> None:
    s = MixedBatchSampler([30], [5], seed=2)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1
    s.set_epoch(1, start_step=4)
    assert list(s) == e1[4:]


def test_ranks_get_disjoint_shares_covering_the_data() -> None:
    ranks = [MixedBatchSampler([40], [5], seed=0, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == 4
    seen = [i for r in ranks for b in r for i, _ in b]
    assert sorted(seen) == list(range(40))


def test_augmentation_seeds_are_distinct_per_item() -> None:
    s = MixedBatchSampler([10, 10], [4, 4], seed=0)
    seeds = [seed for b in s for _, seed in b]
    assert len(set(seeds)) == len(seeds)


def test_m_per_class_batches() -> None:
    classes = [f"c{i // 3}" for i in range(30)]  # 10 classes x 3 images
    s = MixedBatchSampler([30], [8], seed=0, classes=[classes], m_per_class=[4])
    for b in s:
        per_class = Counter(classes[i] for i, _ in b)
        assert len(per_class) == 2 and set(per_class.values()) == {4}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="multiple of m"):
        MixedBatchSampler([30], [6], classes=[["a"] * 30], m_per_class=[4])
    with pytest.raises(ValueError, match="one per_batch"):
        MixedBatchSampler([30, 3], [6])
