"""Helpers for service tests: a real uvicorn server on 127.0.0.1 (in a thread), a deterministic fake
backend whose output encodes its input, and real encoded images."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI
from PIL import Image

from service.backends.base import Backend


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 and an ephemeral port, in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class EchoBackend(Backend):
    """out[i] = (v_i, 1, 0, ..., 0) with v_i = the first input value of image i (solid images: their
    grey level), so a response reveals which image produced it. Optional delay per batch, and a
    poison value that makes the whole batch fail."""

    name = "echo"

    def __init__(self, dim: int, delay_s: float = 0.0, poison: float | None = None) -> None:
        self.dim, self.delay_s, self.poison = dim, delay_s, poison
        self.batches: list[int] = []

    def embed(self, batch: np.ndarray, contended: bool = True) -> np.ndarray:
        self.batches.append(batch.shape[0])
        if self.delay_s:
            time.sleep(self.delay_s)
        values = batch[:, 0, 0, 0].astype(np.float32)
        if self.poison is not None and np.any(np.isclose(values, self.poison, atol=1e-4)):
            raise RuntimeError("poisoned batch")
        out = np.zeros((batch.shape[0], self.dim), dtype=np.float32)
        out[:, 0] = values
        out[:, 1] = 1.0
        return out


def echo_value(vec: list[float]) -> float:
    return vec[0] / vec[1]


def grey_value(level: int, mean: float = 0.485, std: float = 0.229) -> float:
    """The normalized red-channel value of a solid grey image of `level` (ImageNet mean/std)."""
    return (level / 255.0 - mean) / std


def encode_image(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def solid(level: int, size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    return encode_image(Image.new("RGB", size, (level, level, level)), fmt)


def photo(seed: int, size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> bytes:
    """A smooth random colour image (not solid), encoded."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC)
    return encode_image(img, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
