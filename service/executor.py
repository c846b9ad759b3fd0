"""A thread pool that gives each task to the thread that went idle last.

concurrent.futures.ThreadPoolExecutor wakes its idle threads in turn, so one request at a time
alternates between them, and each request finds the other thread's caches and ONNX Runtime's
per-thread state cold. At concurrency 1 that cost the service 6 to 11% of its throughput against
a server whose one worker thread serves every request (scratch runs in docs/service.md). Here the
idle threads form a stack: a lone request runs on the same thread every time, and a second thread
only wakes when two tasks overlap. (anyio's worker threads, which the naive server's FastAPI
`def` route uses, are reused the same way.)
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

_Task = tuple[Future, Callable[..., Any], tuple[Any, ...], dict[str, Any]]
_IDLE: Any = object()  # _work's marker: wait on the inbox for the next task


class WarmThreadPool(Executor):
    """Up to `max_workers` threads, started on demand; a task goes to the most recently idle thread,
    or a new one, or waits in FIFO order for the first thread to finish."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "warm") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max, self._prefix = max_workers, thread_name_prefix
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[_Task | None]] = []  # a stack: the last one idle on top
        self._backlog: deque[_Task] = deque()
        self._threads: list[threading.Thread] = []
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        task: _Task = (future, fn, args, kwargs)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._idle:
                self._idle.pop().put(task)
            elif len(self._threads) < self._max:
                inbox: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
                thread = threading.Thread(target=self._work, args=(task, inbox), daemon=True,
                                          name=f"{self._prefix}_{len(self._threads)}")
                self._threads.append(thread)
                thread.start()
            else:
                self._backlog.append(task)
        return future

    def _work(self, task: _Task | None, inbox: queue.SimpleQueue[_Task | None]) -> None:
        while task is not None:
            future, fn, args, kwargs = task
            outcome: tuple[bool, Any] | None = None
            if future.set_running_or_notify_cancel():
                try:
                    outcome = (True, fn(*args, **kwargs))
                except BaseException as e:  # as concurrent.futures does: the caller decides
                    outcome = (False, e)
            del task, fn, args, kwargs  # drop references (batches) while idle
            # Back on the idle stack before the result is published. The caller, woken by the result,
            # may submit its next task at once: publishing wakes the event loop through a socket write
            # that releases the GIL, and the loop can answer the client, read its next request and
            # submit before this thread runs again. It must find this thread on top, not the other one.
            with self._lock:
                if self._backlog:
                    task = self._backlog.popleft()
                elif self._shutdown:
                    task = None
                else:
                    self._idle.append(inbox)
                    task = _IDLE
            if outcome is not None:
                ok, value = outcome
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
                del value
            del future, outcome
            if task is _IDLE:
                task = inbox.get()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new tasks; queued ones still run unless `cancel_futures`; idle threads exit."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                for future, *_ in self._backlog:
                    future.cancel()
                self._backlog.clear()
            idle, self._idle = self._idle, []
            threads = list(self._threads)
        for inbox in idle:
            inbox.put(None)
        if wait:
            for thread in threads:
                thread.join()
