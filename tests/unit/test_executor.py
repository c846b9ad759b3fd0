"""service.executor.WarmThreadPool: the most recently idle thread takes the next task."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

import pytest

from service.executor import WarmThreadPool


def test_one_task_at_a_time_stays_on_one_thread() -> None:
    pool = WarmThreadPool(4, thread_name_prefix="t")
    busy = [pool.submit(time.sleep, 0.05) for _ in range(3)]  # start three threads
    for f in busy:
        f.result()
    names = [pool.submit(lambda: threading.current_thread().name).result() for _ in range(20)]
    assert len(set(names)) == 1, names
    assert names[0] in {"t_0", "t_1", "t_2"}
    pool.shutdown()
    # What it replaces: the standard pool spreads the same sequence over its idle threads.
    std = ThreadPoolExecutor(4)
    for f in [std.submit(time.sleep, 0.05) for _ in range(3)]:
        f.result()
    assert len({std.submit(lambda: threading.current_thread().name).result() for _ in range(20)}) > 1
    std.shutdown()


def test_a_thread_is_idle_again_before_its_result_is_published() -> None:
    # What a caller woken by a result does at once (the service: answer, read the next request,
    # submit) must find the thread that just finished on top of the idle stack. A done callback runs
    # inside the publishing, so a task it submits shows which thread was idle by then.
    pool = WarmThreadPool(2, thread_name_prefix="t")
    for f in [pool.submit(time.sleep, 0.05) for _ in range(2)]:  # both threads started, both idle
        f.result()
    gate, submitted = threading.Event(), threading.Event()
    nexts: list[Future] = []

    def submit_next(_: Future) -> None:
        nexts.append(pool.submit(lambda: threading.current_thread().name))
        submitted.set()

    first = pool.submit(lambda: (gate.wait(5), threading.current_thread().name)[1])
    first.add_done_callback(submit_next)  # before the task can finish: it runs in the pool's thread
    gate.set()
    assert submitted.wait(5)
    assert nexts[0].result(5) == first.result(5)
    pool.shutdown()


def test_results_errors_and_at_most_max_workers_threads() -> None:
    pool = WarmThreadPool(2)
    assert pool.submit(pow, 2, 10).result() == 1024
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result()
    gate = threading.Event()
    running: set[str] = set()

    def task(i: int) -> int:
        running.add(threading.current_thread().name)
        gate.wait(5)
        return i

    futures = [pool.submit(task, i) for i in range(6)]
    time.sleep(0.1)
    assert len(running) == 2 and sum(f.running() for f in futures) == 2  # four wait in the backlog
    gate.set()
    assert [f.result(5) for f in futures] == list(range(6))
    assert len(running) == 2
    pool.shutdown()


def test_backlog_runs_in_order_and_a_cancelled_task_is_skipped() -> None:
    pool = WarmThreadPool(1)
    gate = threading.Event()
    order: list[int] = []
    first = pool.submit(gate.wait, 5)
    later = [pool.submit(order.append, i) for i in range(4)]
    assert later[2].cancel()
    gate.set()
    first.result()
    for f in later[:2] + later[3:]:
        f.result(5)
    with pytest.raises(CancelledError):
        later[2].result()
    assert order == [0, 1, 3]
    pool.shutdown()


def test_shutdown_finishes_queued_work_then_refuses_new() -> None:
    pool = WarmThreadPool(1)
    gate = threading.Event()
    done: list[int] = []
    pool.submit(gate.wait, 5)
    queued = [pool.submit(done.append, i) for i in range(3)]
    threading.Timer(0.1, gate.set).start()
    pool.shutdown(wait=True)  # waits for the queue to drain and the thread to exit
    assert done == [0, 1, 2] and all(f.done() for f in queued)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(print)


def test_shutdown_can_cancel_what_has_not_started() -> None:
    pool = WarmThreadPool(1)
    gate = threading.Event()
    started = pool.submit(gate.wait, 5)
    queued = [pool.submit(time.sleep, 0) for _ in range(3)]
    threading.Timer(0.1, gate.set).start()
    pool.shutdown(wait=True, cancel_futures=True)
    assert started.result() is True
    assert all(f.cancelled() for f in queued)
    assert not any(t.is_alive() for t in pool._threads)
