"""Helpers for service tests: a real uvicorn server on 127.0.0.1 (in a thread), a deterministic fake
backend whose output encodes its input, and real encoded images."""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI
from PIL import Image

from service.backends.base import Backend
from service.server import watch_connections


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(model: str, port: int, *flags: str) -> subprocess.Popen:
    """`uembed serve` as a real process on 127.0.0.1:port, output captured; returns once /readyz is 200."""
    proc = subprocess.Popen([sys.executable, "-m", "uembed.cli", "serve", "--model", model, "--host", "127.0.0.1",
                             "--port", str(port), *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not become ready: {proc.communicate()[0][-3000:]}")
        time.sleep(0.2)


@contextmanager
def serve_process(model: str, *flags: str) -> Iterator[str]:
    """A ready `uembed serve` process; yields its base URL; stops it (SIGTERM) and checks it exited cleanly."""
    port = free_port()
    proc = start_serve(model, port, *flags)
    # Drained while it runs: a server that logs more than a pipe holds must not block on the write.
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        proc.stdout.close()  # type: ignore[union-attr]
    out = "".join(lines)
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 and an ephemeral port, in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        watch_connections(self.server, app)  # as `uembed serve` does
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


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll `condition` (instead of sleeping a fixed time that a loaded machine can outlast)."""
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


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
