"""Dynamic batching: one bounded queue (counted in images), one inference worker.

`collect_batch` is the pure policy: take up to N images from the head of the queue in order,
splitting a request across batches when needed, and drop (never batch) requests that were
cancelled (client gone, handler gave up) or are past their deadline. `Batcher` is the asyncio
plumbing: admission control (429 when the queue is full), waiting up to max_wait for a batch to
fill, running the backend on its own thread so decoding and encoding overlap inference, and
routing each slice of the output back to its request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.decode import ApiError
from service.metrics import Metrics

log = logging.getLogger("uembed.batcher")


@dataclass(eq=False)
class Job:
    """One request's images on their way through the queue."""

    images: np.ndarray  # (n, 3, S, S) float32
    deadline: float  # time.monotonic() seconds
    future: asyncio.Future[np.ndarray]
    enqueued_at: float = field(default_factory=time.monotonic)
    taken: int = 0  # images handed to batches
    filled: int = 0  # images with results
    results: np.ndarray | None = None
    cancel_reason: str | None = None  # set when its remaining images must leave the queue unprocessed
    queue_seconds: float = 0.0  # longest wait of any of its images
    inference_seconds: float = 0.0  # summed over the batches it took part in

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    @property
    def remaining(self) -> int:
        return self.size - self.taken

    def cancel(self, reason: str) -> None:
        """client_disconnected | deadline_exceeded | inference_failed"""
        if self.cancel_reason is None:
            self.cancel_reason = reason


@dataclass(frozen=True)
class Slice:
    job: Job
    start: int
    stop: int


def collect_batch(pending: deque[Job], max_batch: int, now: float) -> tuple[list[Slice], list[Job]]:
    """Take up to `max_batch` images from the head of `pending`, in order.

    Returns (slices to run, jobs dropped). A job whose images do not all fit stays at the head
    with `taken` advanced, so its next images open the next batch. Cancelled jobs and jobs past
    their deadline leave the queue without being batched.
    """
    slices: list[Slice] = []
    dropped: list[Job] = []
    room = max_batch
    while pending and room > 0:
        job = pending[0]
        if job.cancel_reason is not None or now >= job.deadline:
            dropped.append(pending.popleft())
            continue
        take = min(room, job.remaining)
        slices.append(Slice(job, job.taken, job.taken + take))
        job.taken += take
        room -= take
        if job.remaining == 0:
            pending.popleft()
    return slices, dropped


class Batcher:
    def __init__(self, embed: Callable[[np.ndarray, bool], np.ndarray], *, max_batch: int, max_wait_s: float,
                 max_queue_images: int, metrics: Metrics, executor: Executor, embedding_dim: int,
                 instances: int = 1) -> None:
        """`instances`: batches that may be in the backend at once (the executor needs that many
        threads); a new batch is collected as soon as one of them is free."""
        self.embed, self.max_batch, self.max_wait_s = embed, max_batch, max_wait_s
        self.max_queue_images, self.metrics, self.executor = max_queue_images, metrics, executor
        self.embedding_dim = embedding_dim
        self.instances = max(1, instances)
        self.pending: deque[Job] = deque()
        self.queued_images = 0
        self.decoding = 0  # requests admitted and still decoding: images that will join the queue soon
        self.running = 0  # batches in the backend
        self._in_flight: set[asyncio.Task[None]] = set()
        self.direct = 0  # single-image requests decoding and embedding in one hop on an instance (claim_direct)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._batch_seconds = 0.05  # running estimate, for Retry-After

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="uembed-batcher")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    async def close(self, drain_timeout_s: float) -> None:
        """Stop accepting work; finish what is queued (bounded); fail what is left with 503."""
        self._closing = True
        self._wakeup.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=drain_timeout_s)
        except TimeoutError:
            self._task.cancel()
            for job in self.pending:
                self._fail(job, ApiError(503, "shutting_down", "the server stopped before this request ran"))
            self.pending.clear()

    # -- admission -----------------------------------------------------------------------------
    @property
    def busy(self) -> int:
        """Instances in use: batches in the backend plus direct requests."""
        return self.running + self.direct

    def claim_direct(self) -> bool | None:
        """The direct path for a single-image request: when nothing is queued or decoding and an
        inference instance is free, the request takes that instance and decodes and embeds in one
        hop on its thread (service/api.py, `_direct`): no batch could form around it, and the
        hand-offs through the decode pool and the queue would only add latency. This is how the
        service answers at low concurrency: a one-request-one-forward server, one hop per request.

        Returns None when the request must take the batched path, else whether the backend is
        contended (another instance is busy: run on the contended session's threads). The claim is
        held until `release_direct`."""
        if self.pending or self.decoding or self._closing or self.busy >= self.instances:
            return None
        contended = self.busy > 0
        self.direct += 1
        return contended

    def release_direct(self) -> None:
        self.direct -= 1
        self._wakeup.set()

    def begin_decode(self) -> None:
        self.decoding += 1

    def end_decode(self) -> None:
        """Called after the request was submitted (or failed to decode): the batcher re-decides."""
        self.decoding -= 1
        self._wakeup.set()

    def submit(self, images: np.ndarray, deadline: float) -> Job:
        if self._closing:
            raise ApiError(503, "shutting_down", "the server is shutting down")
        if self._task is None or self._task.done():
            raise ApiError(503, "not_ready", "the batcher is not running")
        n = int(images.shape[0])
        if self.queued_images + n > self.max_queue_images:
            batches_ahead = max(1, self.queued_images // self.max_batch)
            retry = max(1, round(batches_ahead * self._batch_seconds + 0.5))
            raise ApiError(429, "queue_full",
                           f"{self.queued_images} images are queued (limit {self.max_queue_images}); retry later",
                           headers={"Retry-After": str(retry)})
        job = Job(images, deadline, asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self.queued_images += n
        self.metrics.queue_depth.set(self.queued_images)
        self._wakeup.set()
        return job

    # -- the worker ----------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending or self.busy >= self.instances:
                if self._closing and not self.pending:
                    while self._in_flight:
                        await asyncio.wait(set(self._in_flight))
                    return
                # Nothing to do, or every instance busy (direct requests hold theirs): collecting
                # now would park a batch behind them, past the reach of deadlines and disconnects.
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_batch()
            now = time.monotonic()
            slices, dropped = collect_batch(self.pending, self.max_batch, now)
            self._account(slices, dropped)
            if not slices:
                continue
            batch = np.concatenate([s.job.images[s.start : s.stop] for s in slices])
            for s in slices:
                wait = now - s.job.enqueued_at
                s.job.queue_seconds = max(s.job.queue_seconds, wait)
                for _ in range(s.stop - s.start):
                    self.metrics.queue_seconds.observe(wait)
            contended = self.decoding > 0 or self.queued_images > 0 or self.busy > 0
            self.running += 1
            task = loop.create_task(self._infer(batch, slices, contended))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _infer(self, batch: np.ndarray, slices: list[Slice], contended: bool) -> None:
        """Run one batch on the executor and hand each job its rows; a failure fails only its jobs."""
        t0 = time.perf_counter()
        try:
            out = await asyncio.get_running_loop().run_in_executor(self.executor, self.embed, batch, contended)
            out = np.asarray(out, dtype=np.float32)
            if out.shape != (batch.shape[0], self.embedding_dim):
                raise RuntimeError(f"backend returned {out.shape}, expected {(batch.shape[0], self.embedding_dim)}")
        except Exception as e:
            log.exception("inference failed for a batch of %d images", batch.shape[0])
            err = ApiError(500, "inference_failed", f"the model failed on this batch: {type(e).__name__}: {e}")
            for job in {s.job for s in slices}:
                self._fail(job, err)
                job.cancel("inference_failed")  # its images still queued must not run
            return
        finally:
            self.running -= 1
            self._wakeup.set()
        dt = time.perf_counter() - t0
        self.observe_batch(batch.shape[0], dt)
        offset = 0
        for s in slices:
            n = s.stop - s.start
            job = s.job
            if job.results is None:
                job.results = np.empty((job.size, self.embedding_dim), dtype=np.float32)
            job.results[s.start : s.stop] = out[offset : offset + n]
            offset += n
            job.filled += n
            job.inference_seconds += dt
            if job.filled == job.size and not job.future.done():
                job.future.set_result(job.results)

    def observe_batch(self, size: int, seconds: float) -> None:
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        self.metrics.inference_seconds.observe(seconds)
        self.metrics.batch_size.observe(size)
        self.metrics.batch_fill.observe(size / self.max_batch)

    async def _wait_for_batch(self) -> None:
        """Until max_batch images are queued, the oldest has waited max_wait, or no more images are on
        their way (no request still decoding): waiting for company that is not coming only adds latency.
        No wait at all while another instance would stay free after this batch: the next images get that
        instance as soon as they are decoded, so holding this batch for them only delays it."""
        if self.busy + 1 < self.instances:
            return
        oldest = self.pending[0].enqueued_at
        while self.queued_images < self.max_batch and self.decoding > 0 and not self._closing:
            remaining = oldest + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _account(self, slices: list[Slice], dropped: list[Job]) -> None:
        taken = sum(s.stop - s.start for s in slices)
        for job in dropped:
            reason = job.cancel_reason or "deadline_exceeded"
            self.metrics.dropped_images.labels(reason).inc(job.remaining)
            taken += job.remaining
            self._fail(job, ApiError(504, "deadline_exceeded", "the request's deadline passed while queued"))
        self.queued_images -= taken
        self.metrics.queue_depth.set(self.queued_images)

    @staticmethod
    def _fail(job: Job, err: ApiError) -> None:
        if not job.future.done():
            job.future.set_exception(err)
            job.future.exception()  # marked retrieved: the handler may already have given up
