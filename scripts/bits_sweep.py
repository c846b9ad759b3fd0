"""How many sign bits an embedding needs: an exported model's eval-set P@1 by code length.

    python scripts/bits_sweep.py --model models/default --config configs/default.yaml

The served binary code is the D sign bits of the float embedding. Its Hamming distance estimates
the angle between two embeddings from D hyperplanes, so it ranks like float up to that estimate's
noise. This script measures the noise against the float ranking on the config's eval sets by
lengthening the code: D x m bits are the served bits followed by the bits of e R for m - 1
seeded random orthogonal R (each R keeps every float cosine and draws D new hyperplanes). Two more
columns: asymmetric search (the query's float against the gallery's +-1 codes) and a Hamming
shortlist of K gallery items re-ranked by float cosine, the two-stage search a product builds
when it keeps bits for every item and floats on a second tier.

The artifact is run through ONNX Runtime on CPU with its manifest's preprocessing, as served; the
eval sets are read like `uembed evaluate` reads them (the data: `uembed data emoji`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.evaluate import _label_ids, _labels, retrieval_metrics


def sign_codes(emb: np.ndarray, multiple: int, seed: int = 0) -> np.ndarray:
    """(N, D * multiple) bits: emb > 0 (the served code), then the signs of emb @ R for
    `multiple - 1` random orthogonal R drawn from `seed` (the same R for every call with that seed)."""
    if multiple < 1:
        raise ValueError("multiple must be at least 1")
    rng = np.random.default_rng(seed)
    dim = emb.shape[1]
    parts = [emb > 0]
    for _ in range(multiple - 1):
        q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
        parts.append(emb @ (q * np.sign(np.diag(r))) > 0)  # sign fix: Haar-distributed R
    return np.concatenate(parts, axis=1)


def shortlist_p1(query: np.ndarray, query_labels: Sequence[object], gallery: np.ndarray,
                 gallery_labels: Sequence[object], k: int) -> float:
    """P@1 of a two-stage search: the K gallery items nearest in Hamming distance (sign bits, ties
    in gallery order as retrieval_metrics breaks them), then the one with the highest float cosine.
    Queries whose label no gallery item has are left out, as retrieval_metrics leaves them out."""
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    gn = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    qb, gb = np.where(query > 0, 1.0, -1.0), np.where(gallery > 0, 1.0, -1.0)
    shortlist = np.argsort(-(qb @ gb.T), axis=1, kind="stable")[:, :k]
    cos = np.take_along_axis(qn @ gn.T, shortlist, axis=1)
    best = shortlist[np.arange(len(query)), np.argmax(cos, axis=1)]
    qy, gy = _label_ids(query_labels, gallery_labels)
    answerable = np.isin(qy, gy)
    return float(np.mean(gy[best][answerable] == qy[answerable]))


def embed_records(run, spec, records) -> np.ndarray:
    """The records' embeddings by `run` (model_export.onnx.ort_runner), 64 images at a time."""
    images = np.stack([spec.load(str(r.image)) for r in records])
    return np.concatenate([run(images[i:i + 64]) for i in range(0, len(images), 64)])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/default", help="artifact directory (its ONNX file is run)")
    parser.add_argument("--config", default="configs/default.yaml", help="training config naming the eval sets")
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="code lengths as multiples of D (1 = the served code)")
    parser.add_argument("--shortlist", type=int, nargs="+", default=[10, 50], help="Hamming shortlist sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from model_export.manifest import load_manifest
    from model_export.onnx import ort_runner, ort_session
    from training.config import load_config
    from training.data.manifest import read_manifest
    from uembed.preprocess import PreprocessSpec

    manifest = load_manifest(args.model)
    spec = PreprocessSpec.from_dict(manifest.preprocess)
    run = ort_runner(ort_session(manifest.path("onnx")))
    dim = manifest.embedding_dim
    cols = ["float", *(f"{dim * m} bits" for m in args.multiples), "asymmetric",
            *(f"shortlist {k}" for k in args.shortlist)]
    print(f"P@1 (%) of {args.model} ({manifest.name} {manifest.version}) by code; {dim} bits is the served code\n")
    print("| set | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for es in load_config(args.config).eval:
        query = read_manifest(es.query)
        if es.exclude_self or es.gallery == es.query:
            raise SystemExit(f"{es.name}: a set ranked against itself is not supported here")
        gallery = read_manifest(es.gallery)
        q, g = embed_records(run, spec, query), embed_records(run, spec, gallery)
        ql, gl = _labels(query, es.label_key, es.query), _labels(gallery, es.label_key, es.gallery)
        row = [retrieval_metrics(q, ql, g, gl, metric="cosine").p_at_1]
        for m in args.multiples:
            codes = sign_codes(np.concatenate([q, g]), m, args.seed)
            row.append(retrieval_metrics(codes[:len(q)], ql, codes[len(q):], gl, metric="hamming").p_at_1)
        row.append(retrieval_metrics(q, ql, np.where(g > 0, 1.0, -1.0), gl, metric="cosine").p_at_1)
        row += [shortlist_p1(q, ql, g, gl, k) for k in args.shortlist]
        print(f"| {es.name} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
