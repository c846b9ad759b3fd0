"""The backend contract: load from a manifest, embed a batch, report health and batch limits."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from uembed.errors import UserError


class BackendError(UserError):
    """The backend cannot serve this artifact here (missing file, package, GPU, mismatch)."""


class Backend(ABC):
    name: str = "base"
    precision: str = "fp32"
    device: str = "cpu"
    # Batches `embed` may run at once from different threads (1: the backend is not thread-safe).
    max_instances: int = 1

    @property
    def spare_core_when_alone(self) -> bool:
        """Whether, between the runs of requests that come one at a time, the backend leaves the
        other CPU cores free, so that a lone request's JPEG may be decoded on two threads
        (--split-decode-when-alone). GPU backends do; a CPU backend only where it says so."""
        return self.device != "cpu"

    @property
    def max_batch_size(self) -> int:
        """Largest batch `embed` accepts."""
        return 4096

    @abstractmethod
    def embed(self, batch: np.ndarray, contended: bool = True) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, D) float32. Called from up to `max_instances` threads at once.

        `contended` is False when no other request is decoding, queued or running: a CPU backend may then
        use every core; when True, other work needs CPU while this batch runs."""

    def embed_alone(self, batch: np.ndarray) -> np.ndarray:
        """`embed` for a request while the server holds one client connection: nothing else can
        run meanwhile (a CPU backend may keep its threads spinning at idle priority)."""
        return self.embed(batch, contended=False)

    def note_sequential(self) -> None:  # noqa: B027 - an optional hook: a no-op unless a backend uses it
        """Requests are arriving strictly one at a time (one client connection): a CPU backend may
        keep its threads awake between them."""

    def warmup(self, batch: np.ndarray) -> None:
        """Run `batch` through every path `embed` may take (twice: first runs allocate)."""
        for contended in (True, False, True, False):
            self.embed(batch, contended)

    def health(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "precision": self.precision}
