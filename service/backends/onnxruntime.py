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

Spinning between runs holds a core that the next request's parsing and decoding could use. Where
the process may give a thread its priority back (CAP_SYS_NICE, as root, or RLIMIT_NICE 20;
`may_unpark`), the quiet session's pool threads spin between runs at idle priority (Linux
SCHED_IDLE: they give the core at once to any thread that wants it) and run at their own priority
(`IdleBetweenRuns`, `quiet_idle_between_runs`, on by default). Then a lone request's JPEG may take a
decode thread on that core (service/decode.py, `TopBand`); at normal priority the two shared it, and
the split decode cost a quarter of the images/s at concurrency 1.

Without that permission, `quiet_idle_priority` (off by default) runs lone images, while the server
holds one client connection (`embed_alone`), on a fourth session whose threads are idle for good
(inherited from the thread that creates the session). A run waits for the work its pool threads have
taken, and an idle thread gets almost no CPU while normal threads want its core: with the quiet
session itself at idle priority, a client arriving beside a sequential one saw a few requests stall for
0.16 to 0.55 s; with the fourth session only while alone, the sequential client's slowest requests took
up to 0.14 s against 0.05 s without idle priority (docs/service.md, twenty-fourth stop). Hence off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

from model_export.manifest import Manifest
from model_export.onnx import ort_providers, ort_session
from service.backends.base import Backend, BackendError
from service.config import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)


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
        self._idle_between: IdleBetweenRuns | None = None
        if (self.solo_session is not self.session and settings.solo_intra_op_spinning
                and settings.solo_spin_only_in_run and settings.quiet_spin_after_s > 0):
            def quiet() -> object:
                return ort_session(path, providers=providers, intra_op_threads=settings.solo_intra_op_threads,
                                   allow_spinning=True)

            self.quiet_session, started = started_threads(quiet)
            if settings.quiet_idle_between_runs and may_unpark():
                self._idle_between = IdleBetweenRuns(started)
            elif settings.quiet_idle_between_runs:
                log.info("quiet_idle_between_runs does not apply: this process may not give a thread its "
                         "priority back (CAP_SYS_NICE or RLIMIT_NICE 20); the quiet session's threads spin "
                         "at normal priority and lone JPEGs are decoded on one thread")
            if settings.quiet_idle_priority and settings.quiet_when_alone:
                alone, idle = idle_priority(quiet)
                self.alone_session = alone if idle else None
        # Threads that spin after a run at normal priority would share the core a lone request's
        # decode helper needs (the twenty-third stop measured that split at 0.747 of the naive server).
        spins_after_run = settings.intra_op_spinning or (
            self.solo_session is not self.session and settings.solo_intra_op_spinning
            and not settings.solo_spin_only_in_run) or (
            self.quiet_session is not self.solo_session and self._idle_between is None)
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
        return self._run(self.session_for(contended), batch)

    def _run(self, session: object, batch: np.ndarray) -> np.ndarray:
        x = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        if session is self.quiet_session and self._idle_between is not None:
            with self._idle_between.running():
                return session.run(None, x)[0]  # type: ignore[attr-defined]
        return session.run(None, x)[0]  # type: ignore[attr-defined]

    def embed_alone(self, batch: np.ndarray) -> np.ndarray:
        if self.alone_session is None:
            return self.embed(batch, contended=False)
        return self._run(self.alone_session, batch)

    def warmup(self, batch: np.ndarray) -> None:
        sessions = (self.session, self.solo_session, self.quiet_session, self.alone_session)
        for session in {id(s): s for s in sessions if s is not None}.values():
            self._run(session, batch)
            self._run(session, batch)

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


def started_threads(make: Callable[[], T]) -> tuple[T, frozenset[int]]:
    """`make()` and the ids of this process's threads that it started (Linux /proc; elsewhere none).
    ONNX Runtime starts a session's intra-op pool threads when the session is created. Call it while
    nothing else starts threads (the backend loads before the server takes requests)."""
    task = Path("/proc/self/task")
    if not task.is_dir():
        return make(), frozenset()
    before = {int(p.name) for p in task.iterdir()}
    value = make()
    return value, frozenset({int(p.name) for p in task.iterdir()} - before)


def may_unpark() -> bool:
    """Whether this process may move a thread to idle priority and back: the way back from SCHED_IDLE
    needs CAP_SYS_NICE or an RLIMIT_NICE of 20 (sched(7)). Tried on `idle_priority`'s scratch thread."""

    def back() -> bool:
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            return False
        return True

    if not hasattr(os, "SCHED_IDLE"):
        return False
    returned, idle = idle_priority(back)
    return idle and returned


class IdleBetweenRuns:
    """Threads that spin between runs, at idle priority (SCHED_IDLE) except while a run needs them.

    The quiet session's pool threads keep spinning after a run, so that the next lone request finds
    them awake. At normal priority that spinning shares its core with whatever else wants it meanwhile:
    the event loop parsing the next request, the decode, a decode thread taking part of a lone JPEG
    (service/decode.py, `TopBand`). At idle priority they give the core up at once and spin on when it
    is free. For the run they go back to their own priority, so a run never waits on a starved thread
    (what made `quiet_idle_priority`, whose threads stay idle, slow when clients came and went).
    Concurrent runs share one switch: back to idle when the last one ends."""

    def __init__(self, threads: frozenset[int]) -> None:
        self.policies = {tid: (os.sched_getscheduler(tid), os.sched_getparam(tid)) for tid in threads}
        self._lock = threading.Lock()
        self._runs = 0
        self._set(idle=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._lock:
            self._runs += 1
            if self._runs == 1:
                self._set(idle=False)
        try:
            yield
        finally:
            with self._lock:
                self._runs -= 1
                if self._runs == 0:
                    self._set(idle=True)

    def _set(self, idle: bool) -> None:
        for tid, (policy, param) in list(self.policies.items()):
            try:
                if idle:
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                else:
                    os.sched_setscheduler(tid, policy, param)
            except OSError as e:  # the thread ended (a session is not closed while served), or no permission
                log.warning("thread %d: cannot set its priority (%s); left as it is", tid, e)
                del self.policies[tid]
