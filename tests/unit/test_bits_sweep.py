"""scripts/bits_sweep.py: longer sign codes estimate angles as random hyperplanes do, and the
Hamming shortlist re-ranked by float spans Hamming (K = 1) to float (K = gallery) ranking."""

from __future__ import annotations

import numpy as np

from tests.conftest import load_script
from training.evaluate import retrieval_metrics

bits_sweep = load_script("scripts/bits_sweep.py", "bits_sweep")


def test_served_bits_come_first_and_rotations_are_seeded() -> None:
    emb = np.random.default_rng(0).normal(size=(20, 16))
    assert np.array_equal(bits_sweep.sign_codes(emb, 1), emb > 0)
    codes = bits_sweep.sign_codes(emb, 3, seed=5)
    assert codes.shape == (20, 48) and codes.dtype == bool
    assert np.array_equal(codes[:, :16], emb > 0)
    assert np.array_equal(codes, bits_sweep.sign_codes(emb, 3, seed=5))
    assert not np.array_equal(codes[:, 16:], bits_sweep.sign_codes(emb, 3, seed=6)[:, 16:])


def test_long_codes_estimate_the_angle() -> None:
    # Each rotation draws D new hyperplanes, so the share of differing bits approaches angle / pi.
    a = np.zeros(16)
    a[0] = 1.0
    for angle in (0.3, 1.0, 2.0):
        b = np.zeros(16)
        b[0], b[1] = np.cos(angle), np.sin(angle)
        codes = bits_sweep.sign_codes(np.stack([a, b]), 128, seed=1)[:, 16:]  # 2,032 random hyperplanes
        differ = float(np.mean(codes[0] != codes[1]))
        assert abs(differ - angle / np.pi) < 0.04, (angle, differ)


def test_shortlist_spans_hamming_to_float_ranking() -> None:
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(12, 32))
    gl = list(np.repeat(np.arange(12), 4))
    ql = list(rng.integers(0, 12, 60))
    g = centers[gl] + 1.2 * rng.normal(size=(48, 32))
    q = centers[ql] + 1.2 * rng.normal(size=(60, 32))
    flt = retrieval_metrics(q, ql, g, gl, metric="cosine").p_at_1
    ham = retrieval_metrics(q > 0, ql, g > 0, gl, metric="hamming").p_at_1
    assert flt != ham  # the noisy toy data ranks differently in the two codes
    assert bits_sweep.shortlist_p1(q, ql, g, gl, 1) == ham
    assert bits_sweep.shortlist_p1(q, ql, g, gl, 48) == flt


def test_shortlist_reranks_by_float() -> None:
    # The Hamming nearest item (all signs equal, tiny values) is the wrong one; the float re-rank of
    # a 2-item shortlist finds the right one, which differs in one sign.
    q = np.array([[1.0, 1.0, 1.0, 0.01]])
    g = np.array([[0.01, 0.01, 0.01, 1.0], [1.0, 1.0, 1.0, -0.01], [-1.0, -1.0, -1.0, -1.0]])
    assert bits_sweep.shortlist_p1(q, ["a"], g, ["b", "a", "c"], 1) == 0.0
    assert bits_sweep.shortlist_p1(q, ["a"], g, ["b", "a", "c"], 2) == 1.0
