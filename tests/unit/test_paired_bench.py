"""bench/serve/paired.py's verdict: the per-block ratio's median, its bootstrap interval, blocks ahead."""

from __future__ import annotations

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
