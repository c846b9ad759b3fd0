"""ONNX Runtime: the CPU default; on a GPU its TensorRT / CUDA execution providers.

On CPU two sessions share the model: batches of several images run on `intra_op_threads`
(default 1, leaving the other cores to decoding, which is what bounds throughput under load), and
a lone image (an idle server) on `solo_intra_op_threads` (default all cores, spin-waiting between
ops), where latency is what counts. bench/serve measured both choices; see docs/service.md.

The solo session stops its threads' spinning when a run returns (`solo_spin_only_in_run`): under
mixed load, threads spinning after a run take the cores from the next request's decoding. When
requests have come strictly one at a time for `quiet_spin_after_s` (no contended batch), lone
images run on a third session whose threads keep spinning after the run: the next request then
finds them awake instead of waking them (on this 2-core VM about 10% more images/s at
concurrency 1 with a fast client, bench/serve).

With `quiet_idle_priority` (off by default), while the server holds one client connection
(`embed_alone`), lone images run on a fourth session of the same kind whose pool threads run at
idle priority (Linux SCHED_IDLE, inherited from the thread that creates the session): they spin
while nothing else wants their core and give it up at once to a thread that does, such as the
decode thread that takes part of a lone JPEG (service/decode.py `TopBand`). At normal priority the
two shared the core, and the split decode cost a quarter of the images/s at concurrency 1. A thread
at idle priority also gets almost no CPU while normal threads want its core, and a run waits for
the work its pool threads have taken. With the quiet session itself at idle priority, a client
arriving beside a sequential one saw a few requests stall for 0.16 to 0.55 s; with the fourth
session only while alone, the sequential client's slowest requests took up to 0.14 s against 0.05 s
without idle priority (docs/service.md, twenty-fourth stop). Hence off by default.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from model_export.manifest import Manifest
from model_export.onnx import ort_providers, ort_session
from service.backends.base import Backend, BackendError
from service.config import Settings

T = TypeVar("T")


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    max_instances = 64  # InferenceSession.run is thread-safe

    def __init__(self, manifest: Manifest, settings: Settings) -> None:
        path = manifest.path("onnx")
        device = settings.device
        try:
            cache = Path(settings.cache_dir) if settings.cache_dir else Path(manifest.root) / ".ort-cache"
            providers = ort_providers(device, cache_dir=cache)
        except RuntimeError as e:
            raise BackendError(str(e)) from e
        self.session = ort_session(path, providers=providers, intra_op_threads=settings.intra_op_threads,
                                   allow_spinning=settings.intra_op_spinning)
        active = self.session.get_providers()
        self.solo_session = self.session
        if active == ["CPUExecutionProvider"] and settings.solo_intra_op_threads != settings.intra_op_threads:
            self.solo_session = ort_session(path, providers=providers,
                                            intra_op_threads=settings.solo_intra_op_threads,
                                            allow_spinning=settings.solo_intra_op_spinning,
                                            spin_only_in_run=settings.solo_spin_only_in_run)
        self.quiet_session = self.solo_session
        self.alone_session: object | None = None
        if (self.solo_session is not self.session and settings.solo_intra_op_spinning
                and settings.solo_spin_only_in_run and settings.quiet_spin_after_s > 0):
            def quiet() -> object:
                return ort_session(path, providers=providers, intra_op_threads=settings.solo_intra_op_threads,
                                   allow_spinning=True)

            self.quiet_session = quiet()
            if settings.quiet_idle_priority and settings.quiet_when_alone:
                alone, idle = idle_priority(quiet)
                self.alone_session = alone if idle else None
        # Threads that spin after a run at normal priority would share the core a lone request's
        # decode helper needs (the twenty-third stop measured that split at 0.747 of the naive server).
        spins_after_run = settings.intra_op_spinning or (
            self.solo_session is not self.session and settings.solo_intra_op_spinning
            and not settings.solo_spin_only_in_run) or self.quiet_session is not self.solo_session
        self.quiet_after_s = settings.quiet_spin_after_s
        self._last_contended = time.monotonic()  # quiet only after a first quiet period
        self.device = "cuda" if any(p != "CPUExecutionProvider" for p in active) else "cpu"
        self.precision = "fp16" if active and active[0] == "TensorrtExecutionProvider" else "fp32"
        self.providers = active
        self.input_name = self.session.get_inputs()[0].name
        self._spare_core = self.device != "cpu" or self.alone_session is not None or not spins_after_run

    @property
    def spare_core_when_alone(self) -> bool:
        """Lone requests run on the idle-priority session, or no thread of ours spins at normal
        priority after a run (see the module docstring)."""
        return self._spare_core

    def session_for(self, contended: bool) -> object:
        """The contended session, or for a lone batch the solo one, or the quiet one when no batch
        was contended for quiet_after_s."""
        now = time.monotonic()
        if contended:
            self._last_contended = now
            return self.session
        return self.quiet_session if now - self._last_contended >= self.quiet_after_s else self.solo_session

    def note_sequential(self) -> None:
        """Quiet from now on, without waiting quiet_after_s: one client connection cannot overlap."""
        self._last_contended = min(self._last_contended, time.monotonic() - self.quiet_after_s)

    def embed(self, batch: np.ndarray, contended: bool = True) -> np.ndarray:
        session = self.session_for(contended)
        return session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def embed_alone(self, batch: np.ndarray) -> np.ndarray:
        if self.alone_session is None:
            return self.embed(batch, contended=False)
        return self.alone_session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def warmup(self, batch: np.ndarray) -> None:
        x = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        sessions = (self.session, self.solo_session, self.quiet_session, self.alone_session)
        for session in {id(s): s for s in sessions if s is not None}.values():
            session.run(None, x)
            session.run(None, x)

    def health(self) -> dict[str, object]:
        return super().health() | {"providers": self.providers}


def idle_priority(make: Callable[[], T]) -> tuple[T, bool]:
    """`make()`, called on a thread at idle priority (Linux SCHED_IDLE), so that the threads it
    starts inherit that priority: ONNX Runtime starts a session's intra-op pool threads when the
    session is created, with the creating thread's scheduling policy. Returns what `make()` returned
    and whether the priority was set; where the policy does not exist or cannot be set (a seccomp
    profile that forbids it), `make()` runs at normal priority."""
    if not hasattr(os, "SCHED_IDLE"):
        return make(), False
    out: list[T] = []
    error: list[BaseException] = []
    applied: list[bool] = []

    def run() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            applied.append(True)
        except OSError:
            pass
        try:
            out.append(make())
        except BaseException as e:  # re-raised on the caller's thread
            error.append(e)

    thread = threading.Thread(target=run, name="uembed-idle-session")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return out[0], bool(applied)

