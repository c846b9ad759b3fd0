"""What the app holds while it serves: settings, manifest, backend, batcher, pools, metrics."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from model_export.manifest import Manifest
from service.backends.base import Backend
from service.batcher import Batcher
from service.config import Settings
from service.decode import ApiError, DecodeLimits, decode_image
from service.metrics import Metrics
from uembed.preprocess import PreprocessSpec


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    manifest: Manifest | None = None
    backend: Backend | None = None
    batcher: Batcher | None = None
    spec: PreprocessSpec | None = None
    decode_pool: ThreadPoolExecutor | None = None
    infer_pool: ThreadPoolExecutor | None = None
    ready: bool = False
    draining: bool = False
    limits: DecodeLimits = field(init=False)

    def __post_init__(self) -> None:
        self.limits = DecodeLimits(self.settings.max_image_bytes, self.settings.max_image_pixels)

    def is_ready(self) -> bool:
        return self.ready and not self.draining and self.batcher is not None and self.batcher.alive

    def decode_one(self, data: bytes) -> np.ndarray:
        assert self.spec is not None
        t0 = time.perf_counter()
        try:
            return decode_image(data, self.spec, self.limits)
        except ApiError:
            raise
        except Exception as e:  # a decoder failure we did not foresee is still the image's fault, not a 500
            raise ApiError(400, "corrupt_image", f"the image cannot be decoded: {type(e).__name__}: {e}") from e
        finally:
            self.metrics.decode_seconds.observe(time.perf_counter() - t0)

    def client_gone(self) -> None:
        self.metrics.failures.labels("client_disconnected").inc()
