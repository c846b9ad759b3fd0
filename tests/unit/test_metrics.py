"""Retrieval metrics against a brute-force, one-query-at-a-time reference."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate import evaluate_embeddings, markdown_table, paired_loss, retrieval_metrics


def brute_force(q: np.ndarray, ql: list, g: np.ndarray, gl: list, metric: str, exclude=None) -> dict:
    out = {"p@1": [], "avg_p@20": [], "recall@1": [], "recall@5": [], "recall@10": [], "map@r": []}
    for i in range(len(q)):
        items = []
        for j in range(len(g)):
            if exclude is not None and exclude[i] == j:
                continue
            if metric == "cosine":
                score = float(q[i] @ g[j] / (np.linalg.norm(q[i]) * np.linalg.norm(g[j])))
            else:
                score = -int(np.sum(q[i] != g[j]))  # Hamming distance, negated
            items.append((-score, j, gl[j] == ql[i]))  # ties: gallery order
        items.sort(key=lambda t: (t[0], t[1]))
        rel = [r for _, _, r in items]
        r_count = sum(rel)
        if r_count == 0:
            continue
        out["p@1"].append(rel[0])
        out["avg_p@20"].append(sum(rel[:20]) / min(20, len(g)))
        for k in (1, 5, 10):
            out[f"recall@{k}"].append(any(rel[:k]))
        ap, hits = 0.0, 0
        for rank in range(1, r_count + 1):
            if rel[rank - 1]:
                hits += 1
                ap += hits / rank
        out["map@r"].append(ap / r_count)
    means = {k: float(np.mean(v)) for k, v in out.items()}
    means["per_query_p@1"] = np.array(out["p@1"], dtype=bool)
    means["per_query_avg_p@20"] = np.array(out["avg_p@20"])
    return means


@pytest.mark.parametrize("metric", ["cosine", "hamming"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_brute_force(metric: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    dim = 8 if metric == "hamming" else 16  # 8 bits: many ties, which must break the same way
    q = rng.normal(size=(37, dim))
    g = rng.normal(size=(90, dim))
    ql = list(rng.integers(0, 6, 37))
    gl = list(rng.integers(0, 6, 90))
    if metric == "hamming":
        q, g = q > 0, g > 0
    res = retrieval_metrics(q, ql, g, gl, metric=metric, block=10)
    got = res.as_dict()
    ref = brute_force(q, ql, g, gl, metric)
    np.testing.assert_array_equal(res.per_query["p@1"], ref.pop("per_query_p@1"))
    np.testing.assert_allclose(res.per_query["avg_p@20"], ref.pop("per_query_avg_p@20"), atol=1e-12)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_exclude_self_and_queries_without_relevant_items() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 8))
    labels = [i % 7 for i in range(30)]
    labels[0] = 99  # a singleton: no relevant item once itself is excluded
    got = retrieval_metrics(x, labels, x, labels, exclude=np.arange(30), block=7).as_dict()
    ref = brute_force(x, labels, x, labels, "cosine", exclude=np.arange(30))
    assert got["skipped"] == 1 and got["queries"] == 29
    assert len(ref.pop("per_query_p@1")) == len(ref.pop("per_query_avg_p@20")) == 29
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_perfect_and_shape_errors() -> None:
    g = np.eye(4)
    res = retrieval_metrics(g, [0, 1, 2, 3], g, [0, 1, 2, 3])
    assert res.p_at_1 == 1.0 and res.map_at_r == 1.0 and res.avg_p_at_20 == 0.25
    with pytest.raises(ValueError, match="equal D"):
        retrieval_metrics(np.zeros((2, 3)), [0, 1], np.zeros((2, 4)), [0, 1])


def test_paired_loss_counts_and_interval() -> None:
    reference = np.array([True, True, True, False, False])
    other = np.array([True, False, False, True, False])
    got = paired_loss(reference, other)
    d = np.array([0.0, 1.0, 1.0, -1.0, 0.0])  # per-query difference
    half = 1.96 * d.std(ddof=1) / np.sqrt(5)
    assert got["loss"] == pytest.approx(0.2)
    assert got["ci95"] == pytest.approx([0.2 - half, 0.2 + half])
    assert got["reference_only"] == 2 and got["other_only"] == 1
    real = paired_loss(np.array([0.5, 0.25]), np.array([0.25, 0.25]))  # real values: no counts
    assert real["loss"] == pytest.approx(0.125) and "reference_only" not in real
    named = paired_loss(reference, other, ("float", "binary"))
    assert named["float_only"] == 2 and named["binary_only"] == 1
    same = paired_loss(reference, reference)
    assert same["loss"] == 0.0 and same["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="equal 1-D"):
        paired_loss(reference, other[:4])


def test_binary_against_float_is_paired_on_the_same_queries() -> None:
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(12, 32))
    gl = list(np.repeat(np.arange(12), 3))
    g = centers[gl] + 0.8 * rng.normal(size=(36, 32))
    ql = list(rng.integers(0, 12, 50))
    q = centers[ql] + 0.8 * rng.normal(size=(50, 32))
    res = evaluate_embeddings(q, ql, g, gl)
    p1 = res["binary_vs_float"]["p@1"]
    n = res["float"]["queries"]
    assert p1["loss"] == pytest.approx(res["float"]["p@1"] - res["binary"]["p@1"])
    assert p1["float_only"] - p1["binary_only"] == round(p1["loss"] * n)
    assert p1["float_only"] + p1["binary_only"] > 0  # 32 bits lose some queries and win others here
    ap = res["binary_vs_float"]["avg_p@20"]
    assert ap["loss"] == pytest.approx(res["float"]["avg_p@20"] - res["binary"]["avg_p@20"])
    table = markdown_table({"toy": res})
    row = next(line for line in table.splitlines() if line.startswith("| toy | ") and "float" not in line
               and "binary" not in line)
    assert row.split(" | ")[3:5] == [str(p1["float_only"]), str(p1["binary_only"])]
