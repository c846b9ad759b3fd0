"""Float and binary encodings of embeddings, as the API returns them.

float: L2-normalized float32 (the model already normalizes; this guards against drift in a backend).
binary: bit = 1 where float > 0, packed MSB-first exactly like `numpy.packbits`, base64 (standard
alphabet, padded). D bits -> ceil(D / 8) bytes.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np

Output = Literal["float", "binary", "both"]
OUTPUTS = ("float", "binary", "both")


def normalize(embeddings: np.ndarray) -> np.ndarray:
    emb = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


def pack_binary(embeddings: np.ndarray) -> list[str]:
    bits = np.packbits(np.asarray(embeddings) > 0, axis=1)
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in bits]


def encode(embeddings: np.ndarray, output: Output) -> list[dict[str, object]]:
    """One dict per image: {"float": ndarray row} and/or {"binary": base64}."""
    emb = normalize(embeddings)
    rows: list[dict[str, object]] = [{} for _ in range(emb.shape[0])]
    if output in ("float", "both"):
        for row, vec in zip(rows, emb, strict=True):
            row["float"] = vec
    if output in ("binary", "both"):
        for row, code in zip(rows, pack_binary(emb), strict=True):
            row["binary"] = code
    return rows
