"""Parity of an exported format against eager PyTorch float32, on real images.

Figures: cosine between the format's and the reference embeddings (min and mean), the fraction
of sign bits that agree, and the fraction of images whose nearest neighbour among the other
parity images is the same. A format out of its precision's bounds fails the export with a
message naming the figure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from uembed.errors import UserError
from uembed.preprocess import PreprocessSpec

BOUNDS = {
    "fp32": {"cosine_min": 0.9999, "bits_agree": 0.999},
    "fp16": {"cosine_min": 0.999, "bits_agree": 0.99},
}


class ParityError(UserError):
    pass


def load_images(paths: Sequence[str | Path], spec: PreprocessSpec) -> np.ndarray:
    """(N, 3, S, S) float32 through the shared preprocessing, as serving will see them."""
    return np.stack([spec.load(str(p)) for p in paths])


def _nearest_other(emb: np.ndarray) -> np.ndarray:
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(axis=1)


def parity_figures(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    if reference.shape != candidate.shape:
        raise ParityError(f"output shape {candidate.shape} differs from the reference {reference.shape}")
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    cos = (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-12)
    figures = {
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "bits_agree": float(((ref > 0) == (cand > 0)).mean()),
        "max_abs_diff": float(np.abs(ref - cand).max()),
        "images": int(ref.shape[0]),
    }
    if ref.shape[0] > 1:
        figures["nn_agree"] = float((_nearest_other(ref) == _nearest_other(cand)).mean())
    return figures


def check_bounds(name: str, precision: str, figures: dict[str, float]) -> None:
    for key, bound in BOUNDS[precision].items():
        if figures[key] < bound:
            raise ParityError(
                f"{name} ({precision}) fails parity: {key} = {figures[key]:.6f} < {bound} "
                f"(cosine_mean {figures['cosine_mean']:.6f}, bits_agree {figures['bits_agree']:.4%})")


def run_batched(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                batch_sizes: Sequence[int] = (1, 3, 17)) -> np.ndarray:
    """Run `fn` over `images` in chunks cycling through `batch_sizes` (exercises dynamic batch)."""
    out, i, k = [], 0, 0
    while i < len(images):
        b = batch_sizes[k % len(batch_sizes)]
        out.append(np.asarray(fn(images[i : i + b]), dtype=np.float32))
        i, k = i + b, k + 1
    return np.concatenate(out)
