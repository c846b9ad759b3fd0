"""service.backends.onnxruntime's thread-priority helpers, on plain Python threads (Linux)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.backends.onnxruntime import IdleBetweenRuns, may_unpark, started_threads

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE") or not os.path.isdir("/proc/self/task"),
                                reason="SCHED_IDLE and /proc/self/task are Linux-only")


@pytest.fixture
def sleepers() -> Iterator[tuple[frozenset[int], threading.Event]]:
    """Two threads that wait until released, and their ids as started_threads finds them."""
    release = threading.Event()
    pool: list[threading.Thread] = []

    def start() -> int:
        for _ in range(2):
            pool.append(threading.Thread(target=release.wait))
            pool[-1].start()
        return len(pool)

    count, tids = started_threads(start)
    assert count == 2
    yield tids, release
    release.set()
    for t in pool:
        t.join()


def test_started_threads_finds_the_threads_make_started(sleepers: tuple[frozenset[int], threading.Event]) -> None:
    tids, _ = sleepers
    assert len(tids) == 2 and threading.get_native_id() not in tids
    assert tids <= {int(t) for t in os.listdir("/proc/self/task")}


def test_may_unpark_is_what_the_process_holds() -> None:
    """sched(7): leaving SCHED_IDLE needs CAP_SYS_NICE or an RLIMIT_NICE of at least 20."""
    import resource

    status = dict(line.split(":", 1)
              for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    cap_sys_nice = bool(int(status["CapEff"].strip(), 16) >> 23 & 1)
    soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    policy = os.sched_getscheduler(0)
    assert may_unpark() == (cap_sys_nice or soft == resource.RLIM_INFINITY or soft >= 20)
    assert os.sched_getscheduler(0) == policy != os.SCHED_IDLE  # tried on a scratch thread


def test_idle_between_runs_switches_only_around_runs(sleepers: tuple[frozenset[int], threading.Event]) -> None:
    if not may_unpark():
        pytest.skip("this process may not give a thread its priority back (needs CAP_SYS_NICE)")
    tids, _ = sleepers
    before = {tid: os.sched_getscheduler(tid) for tid in tids}

    def policies() -> set[int]:
        return {os.sched_getscheduler(tid) for tid in tids}

    idle = IdleBetweenRuns(tids)
    assert policies() == {os.SCHED_IDLE}
    with idle.running():
        assert {os.sched_getscheduler(tid) for tid in tids} == set(before.values())
        with idle.running():  # a second run at once: one switch for both
            assert policies() == set(before.values())
        assert policies() == set(before.values()), "idle again while a run is still going"
    assert policies() == {os.SCHED_IDLE}
    with pytest.raises(RuntimeError, match="model failed"), idle.running():
        raise RuntimeError("model failed")
    assert policies() == {os.SCHED_IDLE}  # back to idle after a failed run too
    assert os.sched_getscheduler(0) != os.SCHED_IDLE


def test_a_thread_that_ended_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    if not may_unpark():
        pytest.skip("this process may not give a thread its priority back (needs CAP_SYS_NICE)")
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    _, tids = started_threads(thread.start)
    idle = IdleBetweenRuns(tids)
    release.set()
    thread.join()
    with caplog.at_level(logging.WARNING), idle.running():
        pass
    assert not idle.policies and "cannot set its priority" in caplog.text
