"""Retrieval evaluation: P@1, Avg P@20, Recall@K and MAP@R, for float (cosine) and binary (Hamming).

Exact search in blocks of queries. Binary codes are ranked by Hamming distance through the
identity hamming(a, b) = (D - s_a . s_b) / 2 with s = 2*bit - 1, which is an exact integer
matmul in float32 for D < 2**24. Ties are broken by gallery order (stable sort), so results are
deterministic and identical to a brute-force loop.

Each set also compares its binary codes with its float embedding query by query
(`binary_vs_float`): the P@1 and Avg P@20 points binary gives up, each with a 95% interval, and
how many queries each code alone gets right at rank 1. The codes rank the same queries, so the
paired difference is what has to be judged, not two independent proportions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from training.data.manifest import Record, read_manifest
from training.model import color_layout
from uembed.preprocess import PreprocessSpec

AVG_P_K = 20
RECALL_KS = (1, 5, 10)


@dataclass
class RetrievalResult:
    queries: int
    skipped: int  # queries with no relevant gallery item (left out of the averages)
    p_at_1: float
    avg_p_at_20: float
    recall: dict[int, float]
    map_at_r: float
    # Per evaluated query (skipped ones left out, in query order): "p@1" (relevant at rank 1, bool)
    # and "avg_p@20". Not in as_dict.
    per_query: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, object]:
        return {
            "queries": self.queries, "skipped": self.skipped, "p@1": self.p_at_1,
            "avg_p@20": self.avg_p_at_20, **{f"recall@{k}": v for k, v in self.recall.items()},
            "map@r": self.map_at_r,
        }


def _label_ids(query: Sequence[object], gallery: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
    _, inverse = np.unique(np.asarray([str(x) for x in (*query, *gallery)]), return_inverse=True)
    return inverse[: len(query)], inverse[len(query):]


def retrieval_metrics(query: np.ndarray, query_labels: Sequence[object], gallery: np.ndarray,
                      gallery_labels: Sequence[object], *, metric: str = "cosine",
                      exclude: np.ndarray | None = None, block: int = 256) -> RetrievalResult:
    """Rank `gallery` for every query. metric: cosine (float rows) or hamming (0/1 bit rows).

    `exclude[i]` is a gallery index to leave out for query i (itself), or -1.
    """
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query {query.shape} and gallery {gallery.shape} must be (N, D) with equal D")
    if metric == "hamming":
        q = (2.0 * query.astype(np.float32) - 1.0)
        g = (2.0 * gallery.astype(np.float32) - 1.0)
    elif metric == "cosine":
        q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
        g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
        q, g = q.astype(np.float32), g.astype(np.float32)
    else:
        raise ValueError(f"unknown metric {metric!r}")
    qy, gy = _label_ids(query_labels, gallery_labels)
    n_gallery = g.shape[0]
    k20 = min(AVG_P_K, n_gallery)
    p1, ap20, mapr = [], [], []
    recall = {k: [] for k in RECALL_KS}
    skipped = 0
    for start in range(0, q.shape[0], block):
        scores = q[start : start + block] @ g.T
        rows = np.arange(scores.shape[0])
        if exclude is not None:
            ex = exclude[start : start + block]
            has = ex >= 0
            scores[rows[has], ex[has]] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")
        rel = gy[order] == qy[start : start + block, None]
        if exclude is not None:
            # The excluded item sorts last; it must not count as relevant.
            rel[has, -1] = False
        n_rel = rel.sum(axis=1)
        ok = n_rel > 0
        skipped += int((~ok).sum())
        rel, n_rel = rel[ok], n_rel[ok]
        if not len(rel):
            continue
        p1.append(rel[:, 0])
        ap20.append(rel[:, :k20].sum(axis=1) / k20)
        for k in RECALL_KS:
            recall[k].append(rel[:, : min(k, n_gallery)].any(axis=1))
        # MAP@R: over the first R ranks (R = number relevant), average precision at each relevant hit.
        ranks = np.arange(1, rel.shape[1] + 1)
        within_r = ranks[None, :] <= n_rel[:, None]
        hits = rel & within_r
        precision_at = np.cumsum(hits, axis=1) / ranks[None, :]
        mapr.append((precision_at * hits).sum(axis=1) / n_rel)

    def mean(parts: list[np.ndarray]) -> float:
        return float(np.concatenate(parts).mean()) if parts else 0.0

    return RetrievalResult(
        queries=int(q.shape[0]) - skipped, skipped=skipped, p_at_1=mean(p1), avg_p_at_20=mean(ap20),
        recall={k: mean(v) for k, v in recall.items()}, map_at_r=mean(mapr),
        per_query={"p@1": np.concatenate(p1) if p1 else np.zeros(0, dtype=bool),
                   "avg_p@20": np.concatenate(ap20) if ap20 else np.zeros(0)},
    )


# The per-query metrics kept in eval.json and compared query by query (binary_vs_float, compare_runs.py).
PAIRED_METRICS = ("p@1", "avg_p@20")


def paired_loss(reference: np.ndarray, other: np.ndarray,
                names: tuple[str, str] = ("reference", "other")) -> dict[str, object]:
    """What `other` gives up against `reference` on the same queries (one value per query each).

    loss = mean(reference) - mean(other); ci95 = loss +- 1.96 standard errors of the per-query
    difference (normal approximation). For boolean hits (P@1) it also counts the queries only one
    of them gets right, as `<name>_only` for each of `names` (McNemar's discordant pairs).
    """
    if reference.shape != other.shape or reference.ndim != 1:
        raise ValueError(f"need two equal 1-D arrays, not {reference.shape} and {other.shape}")
    n = len(reference)
    d = reference.astype(np.float64) - other.astype(np.float64)
    loss = float(d.mean()) if n else 0.0
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    out: dict[str, object] = {"loss": loss, "ci95": [loss - 1.96 * se, loss + 1.96 * se]}
    if reference.dtype == bool and other.dtype == bool:
        out[f"{names[0]}_only"] = int((reference & ~other).sum())
        out[f"{names[1]}_only"] = int((other & ~reference).sum())
    return out


class _ImageList(Dataset):
    def __init__(self, records: Sequence[Record], spec: PreprocessSpec) -> None:
        self.records, self.spec = list(records), spec

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.spec.load(str(self.records[i].image)))


@torch.no_grad()
def embed_records(model: torch.nn.Module, records: Sequence[Record], spec: PreprocessSpec,
                  device: str | torch.device = "cpu", batch_size: int = 64, num_workers: int = 2) -> np.ndarray:
    """L2-normalized float embeddings of the records' images, in order (eval preprocessing)."""
    loader = DataLoader(_ImageList(records, spec), batch_size=batch_size, num_workers=num_workers)
    model.eval()
    out = [model(batch.to(device)).float().cpu().numpy() for batch in loader]
    return np.concatenate(out)


def _labels(records: Sequence[Record], key: str, where: str) -> list[str]:
    labels = []
    for r in records:
        v = r.labels.get(key)
        if v is None:
            raise ValueError(f"{where}: {r.image} has no '{key}' label")
        labels.append(v if isinstance(v, str) else "|".join(sorted(v)))
    return labels


def evaluate_embeddings(q_emb: np.ndarray, q_labels: Sequence[object], g_emb: np.ndarray,
                        g_labels: Sequence[object], exclude: np.ndarray | None = None) -> dict[str, dict]:
    """Float and binary (embedding > 0) results for one query/gallery pair, and what binary gives up
    against float query by query (paired_loss on P@1 and Avg P@20)."""
    flt = retrieval_metrics(q_emb, q_labels, g_emb, g_labels, metric="cosine", exclude=exclude)
    binary = retrieval_metrics(q_emb > 0, q_labels, g_emb > 0, g_labels, metric="hamming", exclude=exclude)
    versus = {metric: paired_loss(flt.per_query[metric], binary.per_query[metric], ("float", "binary"))
              for metric in PAIRED_METRICS}
    out: dict[str, dict] = {"float": flt.as_dict(), "binary": binary.as_dict(), "binary_vs_float": versus}
    for kind, res in (("float", flt), ("binary", binary)):
        # Kept so that two runs can be compared query by query (scripts/compare_runs.py).
        out[kind]["per_query"] = {m: (v.astype(int) if v.dtype == bool else v).tolist()
                                  for m, v in res.per_query.items()}
    return out


def evaluate_sets(model: torch.nn.Module, eval_sets: Sequence, spec: PreprocessSpec,
                  device: str | torch.device = "cpu", num_workers: int = 2) -> dict[str, dict]:
    """Evaluate every configured set (training.config.EvalSetConfig)."""
    results: dict[str, dict] = {}
    for es in eval_sets:
        query = read_manifest(es.query)
        gallery = query if es.exclude_self or es.gallery == es.query else read_manifest(es.gallery)
        q_emb = embed_records(model, query, spec, device, num_workers=num_workers)
        g_emb = q_emb if gallery is query else embed_records(model, gallery, spec, device, num_workers=num_workers)
        exclude = np.arange(len(query)) if gallery is query else None
        results[es.name] = evaluate_embeddings(
            q_emb, _labels(query, es.label_key, es.query), g_emb, _labels(gallery, es.label_key, es.gallery), exclude)
        results[es.name]["label_key"] = es.label_key
        results[es.name]["gallery_size"] = len(gallery)
    return results


def markdown_table(results: dict[str, dict]) -> str:
    cols = ["p@1", "avg_p@20", "recall@1", "recall@5", "recall@10", "map@r"]
    lines = ["| set | codes | queries | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for name, res in results.items():
        for kind in ("float", "binary"):
            r = res[kind]
            cells = " | ".join(f"{100 * r[c]:.1f}" for c in cols)
            lines.append(f"| {name} | {kind} | {r['queries']} | {cells} |")
    paired = {name: res["binary_vs_float"] for name, res in results.items() if "binary_vs_float" in res}
    if paired:
        lines += ["", "What binary gives up against float, query by query (points; 95% interval; queries "
                  "right at rank 1 in one code only):", "",
                  "| set | p@1 loss | 95% interval | float only | binary only | avg_p@20 loss | 95% interval |",
                  "|---|---|---|---|---|---|---|"]

        def span(g: dict) -> str:
            lo, hi = g["ci95"]
            return f"{100 * lo:.1f} to {100 * hi:.1f}"

        for name, v in paired.items():
            p1, ap = v["p@1"], v["avg_p@20"]
            lines.append(f"| {name} | {100 * p1['loss']:.1f} | {span(p1)} | {p1['float_only']} | "
                         f"{p1['binary_only']} | {100 * ap['loss']:.1f} | {span(ap)} |")
    return "\n".join(lines) + "\n"


class PixelBaseline(torch.nn.Module):
    """The downsampled-pixels baseline: the preprocessed image averaged down to `grid` x `grid`,
    flattened and L2-normalized (3 * grid**2 dimensions; binary = sign of the normalized pixels)."""

    def __init__(self, grid: int = 16) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(color_layout(x, self.grid), dim=1)


BASELINES = ("pixels", "untrained")


def evaluate_baseline(config: str | Path, baseline: str, out: str | Path, num_workers: int = 2) -> dict[str, dict]:
    """`uembed evaluate --config C --baseline B`: the config's eval sets embedded by 16x16 pixels or
    by the config's network with its seeded initial weights (no training)."""
    from training.config import load_config
    from training.model import UnifiedEmbeddingModel

    cfg = load_config(config)
    if not cfg.eval:
        raise ValueError(f"{config}: the config names no eval sets")
    if baseline == "pixels":
        model: torch.nn.Module = PixelBaseline(16)
    elif baseline == "untrained":
        torch.manual_seed(cfg.seed)
        model = UnifiedEmbeddingModel(cfg.model)
    else:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {', '.join(BASELINES)}")
    results = evaluate_sets(model, cfg.eval, cfg.preprocess_spec, "cpu", num_workers)
    report = {"baseline": baseline, "config": str(config), "results": results}
    _write_report(Path(out), report)
    return report


def _write_report(out_path: Path, report: dict) -> None:
    """The JSON report and its markdown table beside it (.md)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    out_path.with_suffix(".md").write_text(markdown_table(report["results"]))


def evaluate_run(run: str | Path, out: str | Path | None = None, device: str = "cpu",
                 num_workers: int = 2) -> dict[str, dict]:
    """`uembed evaluate`: the run's newest checkpoint on the eval sets its config names."""
    from training.checkpoint import load_model, resolve_checkpoint

    ckpt = resolve_checkpoint(run)
    model, cfg = load_model(ckpt, device)
    if not cfg.eval:
        raise ValueError(f"{ckpt}: the run's config names no eval sets")
    results = evaluate_sets(model, cfg.eval, cfg.preprocess_spec, device, num_workers)
    report = {"checkpoint": str(ckpt), "results": results}
    _write_report(Path(out) if out else Path(run) / "eval.json", report)
    return report
