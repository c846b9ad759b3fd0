"""What the app holds while it serves: settings, manifest, backend, batcher, pools, metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Gauge

from model_export.manifest import Manifest
from service.backends.base import Backend
from service.batcher import Batcher
from service.config import Settings
from service.decode import ApiError, DecodeLimits, decode_image
from service.metrics import Metrics
from uembed.preprocess import PreprocessSpec


class UploadBudget:
    """The request-body bytes all requests hold at once (being received, parsed or decoded), bounded:
    the per-request limit alone lets a few dozen large uploads at once take gigabytes (24 concurrent
    48 MB multipart requests took the process from 314 MB to 3.9 GB, docs/service.md), and an
    out-of-memory kill loses every request in flight. Used from the event loop only (no lock)."""

    def __init__(self, limit: int, gauge: Gauge) -> None:
        self.limit, self.gauge = limit, gauge
        self.held = 0

    @contextmanager
    def hold(self) -> Iterator[Callable[[int], None]]:
        """A request's share: the yielded `take(n)` adds n bytes to it or raises 429 uploads_full;
        the whole share is given back when the block ends."""
        taken = 0

        def take(n: int) -> None:
            nonlocal taken
            if self.held + n > self.limit:
                raise ApiError(429, "uploads_full", f"{self.held} bytes of request bodies are being received or "
                               f"decoded (limit {self.limit}); retry later", headers={"Retry-After": "1"})
            self.held += n
            taken += n
            self.gauge.set(self.held)

        try:
            yield take
        finally:
            self.held -= taken
            self.gauge.set(self.held)


class Connections(set):  # type: ignore[type-arg]
    """The HTTP server's open client connections (uvicorn's `ServerState.connections`, replaced by
    this before it starts: uvicorn only adds and discards), and when more than one was last open."""

    def __init__(self) -> None:
        super().__init__()
        self.crowded_at = -float("inf")  # time.monotonic() when more than one was last open

    def add(self, item: object) -> None:
        super().add(item)
        if len(self) > 1:
            self.crowded_at = time.monotonic()

    def discard(self, item: object) -> None:
        if len(self) > 1:
            self.crowded_at = time.monotonic()
        super().discard(item)


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    manifest: Manifest | None = None
    backend: Backend | None = None
    batcher: Batcher | None = None
    spec: PreprocessSpec | None = None
    decode_pool: Executor | None = None
    infer_pool: Executor | None = None
    ready: bool = False
    draining: bool = False
    # The HTTP server's open connections, where the launcher provides them (service/server.py);
    # None: unknown, never `alone`.
    http_connections: Connections | None = None
    limits: DecodeLimits = field(init=False)
    uploads: UploadBudget = field(init=False)

    def __post_init__(self) -> None:
        self.limits = DecodeLimits(self.settings.max_image_bytes, self.settings.max_image_pixels)
        self.uploads = UploadBudget(self.settings.max_body_bytes_in_flight, self.metrics.body_bytes)

    def is_ready(self) -> bool:
        return self.ready and not self.draining and self.batcher is not None and self.batcher.alive

    def decode_one(self, data: bytes, helper: Executor | None = None) -> np.ndarray:
        """One image's array; with `helper` (a pool with a thread to spare) a large JPEG may use it."""
        assert self.spec is not None
        t0 = time.perf_counter()
        try:
            return decode_image(data, self.spec, self.limits, helper)
        except ApiError:
            raise
        except Exception as e:  # a decoder failure we did not foresee is still the image's fault, not a 500
            raise ApiError(400, "corrupt_image", f"the image cannot be decoded: {type(e).__name__}: {e}") from e
        finally:
            self.metrics.decode_seconds.observe(time.perf_counter() - t0)

    def alone(self) -> bool:
        """One client connection is open: the request being served is the only one that can be."""
        return self.http_connections is not None and len(self.http_connections) <= 1

    def alone_for(self, seconds: float) -> bool:
        """`alone`, and no second connection was open in the last `seconds`: one client, not a moment
        between clients that come and go."""
        conns = self.http_connections
        return conns is not None and len(conns) <= 1 and time.monotonic() - conns.crowded_at >= seconds

    def client_gone(self) -> None:
        self.metrics.failures.labels("client_disconnected").inc()
