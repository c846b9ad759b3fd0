"""bench/serve/paired.py's verdict: the per-block ratio's median, its bootstrap interval, blocks ahead."""

from __future__ import annotations

import itertools

import numpy as np

from tests.conftest import load_script


def _paired():  # paired.py puts bench/serve on sys.path itself, for its `run` import
    return load_script("bench/serve/paired.py", "paired_bench")


def test_a_variant_ahead_in_every_block_has_an_interval_above_one() -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(90, 140, 30)  # the machine drifts; the variant is 6% faster in each block
    ratio, low, high, ahead = _paired().ratio_summary(base * rng.uniform(1.04, 1.08, 30), base)
    assert 1.04 < low <= ratio <= high < 1.08
    assert ahead == 30


def test_a_level_variant_has_an_interval_that_holds_one() -> None:
    rng = np.random.default_rng(2)
    base = rng.uniform(90, 140, 40)
    values = base * rng.uniform(0.9, 1.1, 40)
    paired = _paired()
    ratio, low, high, ahead = paired.ratio_summary(values, base)
    assert low < 1.0 < high
    assert 10 < ahead < 30
    assert paired.ratio_summary(values, base) == (ratio, low, high, ahead)  # seeded: the same verdict twice


def test_blocks_rotate_which_variant_comes_first_and_repeated_variants_are_told_apart() -> None:
    paired = _paired()
    orders = [paired.visiting_order(3, b) for b in range(6)]
    assert all(sorted(o) == [0, 1, 2] for o in orders)
    assert [o[0] for o in orders] == [0, 1, 2, 0, 1, 2]
    # each variant follows each other one within the run, counting across block boundaries
    visits = [i for o in orders for i in o]
    follows = {(a, b) for a, b in itertools.pairwise(visits) if a != b}
    assert follows == {(a, b) for a in range(3) for b in range(3) if a != b}
    assert paired.labels(["naive", "uembed", "uembed", "uembed,--x", "uembed"]) == [
        "naive", "uembed", "uembed #2", "uembed,--x", "uembed #3"]
