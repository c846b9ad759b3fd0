"""Batch collection (pure) and the asyncio batcher with a fake embed function."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batcher import Batcher, Job, collect_batch
from service.decode import ApiError
from service.metrics import Metrics


def job(n: int, deadline: float = 1e18, tag: float = 0.0) -> Job:
    images = np.full((n, 3, 2, 2), tag, dtype=np.float32)
    images[:, 0, 0, 0] = tag + np.arange(n)
    return Job(images, deadline, future=None)  # type: ignore[arg-type]


def test_collect_takes_up_to_n_in_order_and_splits_a_job() -> None:
    a, b, c = job(3), job(4), job(2)
    pending = deque([a, b, c])
    slices, dropped = collect_batch(pending, 5, now=0.0)
    assert [(s.job, s.start, s.stop) for s in slices] == [(a, 0, 3), (b, 0, 2)]
    assert not dropped and list(pending) == [b, c] and b.taken == 2
    slices, _ = collect_batch(pending, 5, now=0.0)
    assert [(s.job, s.start, s.stop) for s in slices] == [(b, 2, 4), (c, 0, 2)]
    assert not pending


def test_collect_drops_cancelled_and_expired_jobs_without_batching_them() -> None:
    a, b, c = job(2), job(2, deadline=5.0), job(1)
    a.cancel("client_disconnected")
    pending = deque([a, b, c])
    slices, dropped = collect_batch(pending, 8, now=10.0)
    assert dropped == [a, b] and [s.job for s in slices] == [c]


def test_collect_on_an_empty_queue_and_a_single_big_job() -> None:
    assert collect_batch(deque(), 4, 0.0) == ([], [])
    big = job(10)
    pending = deque([big])
    sizes = []
    while pending:
        slices, _ = collect_batch(pending, 4, 0.0)
        sizes.append(sum(s.stop - s.start for s in slices))
    assert sizes == [4, 4, 2]


def _run(coro):
    return asyncio.run(coro)


def make_batcher(embed, **kw) -> Batcher:
    opts = {"max_batch": 4, "max_wait_s": 0.01, "max_queue_images": 64}
    opts.update(kw)
    opts.setdefault("executor", ThreadPoolExecutor(1))
    return Batcher(embed, metrics=Metrics(opts["max_batch"]), embedding_dim=2, **opts)


def echo(batch: np.ndarray) -> np.ndarray:
    out = np.zeros((batch.shape[0], 2), dtype=np.float32)
    out[:, 0] = batch[:, 0, 0, 0]
    out[:, 1] = 1
    return out


def test_results_come_back_in_order_across_batches() -> None:
    async def main() -> None:
        seen: list[int] = []

        def embed(batch: np.ndarray, contended: bool = True) -> np.ndarray:
            seen.append(batch.shape[0])
            return echo(batch)

        b = make_batcher(embed)
        b.start()
        jobs = [b.submit(job(n, tag=100 * i).images, time.monotonic() + 5) for i, n in enumerate([3, 7, 1, 5])]
        results = await asyncio.gather(*(j.future for j in jobs))
        for i, (j, r) in enumerate(zip(jobs, results, strict=True)):
            np.testing.assert_array_equal(r[:, 0], 100 * i + np.arange(j.size))
        assert max(seen) == 4 and sum(seen) == 16  # 16 images in batches of at most 4
        await b.close(1.0)

    _run(main())


def test_full_queue_answers_429_with_retry_after() -> None:
    async def main() -> None:
        b = make_batcher(lambda x, contended=True: (time.sleep(0.05), echo(x))[1], max_queue_images=6)
        b.start()
        b.submit(job(4).images, time.monotonic() + 5)
        with pytest.raises(ApiError) as err:
            b.submit(job(3).images, time.monotonic() + 5)
        assert err.value.status == 429 and err.value.code == "queue_full"
        assert int(err.value.headers["Retry-After"]) >= 1
        b.submit(job(2).images, time.monotonic() + 5)  # still fits
        await b.close(2.0)

    _run(main())


def test_a_failing_batch_fails_only_its_requests_and_the_batcher_goes_on() -> None:
    async def main() -> None:
        def embed(batch: np.ndarray, contended: bool = True) -> np.ndarray:
            if np.any(batch[:, 0, 0, 0] == 666):
                raise RuntimeError("boom")
            return echo(batch)

        b = make_batcher(embed, max_batch=2, max_wait_s=0.0)
        b.start()
        bad = b.submit(job(1, tag=666).images, time.monotonic() + 5)
        with pytest.raises(ApiError) as err:
            await bad.future
        assert err.value.status == 500 and "boom" in err.value.detail
        good = b.submit(job(2, tag=1).images, time.monotonic() + 5)
        np.testing.assert_array_equal((await good.future)[:, 0], [1, 2])
        assert b.alive
        await b.close(1.0)

    _run(main())


def test_expired_jobs_leave_the_queue_unprocessed() -> None:
    async def main() -> None:
        ran: list[int] = []

        def embed(batch: np.ndarray, contended: bool = True) -> np.ndarray:
            ran.append(batch.shape[0])
            time.sleep(0.1)
            return echo(batch)

        b = make_batcher(embed, max_batch=2, max_wait_s=0.0)
        b.start()
        first = b.submit(job(2).images, time.monotonic() + 5)
        await asyncio.sleep(0.02)  # the first batch is running now
        late = b.submit(job(2).images, time.monotonic() + 0.03)
        await first.future
        with pytest.raises(ApiError) as err:
            await late.future
        assert err.value.status == 504 and ran == [2]
        assert b.queued_images == 0
        await b.close(1.0)

    _run(main())


def test_close_drains_the_queue() -> None:
    async def main() -> None:
        b = make_batcher(lambda x, contended=True: (time.sleep(0.02), echo(x))[1], max_batch=2)
        b.start()
        jobs = [b.submit(job(2).images, time.monotonic() + 5) for _ in range(5)]
        await b.close(5.0)
        assert all(j.future.done() and j.future.exception() is None for j in jobs)
        with pytest.raises(ApiError, match="shutting down"):
            b.submit(job(1).images, time.monotonic() + 5)

    _run(main())


def test_waits_only_while_more_images_are_on_their_way() -> None:
    async def main() -> None:
        seen: list[int] = []
        hints: list[bool] = []

        def embed(batch: np.ndarray, contended: bool = True) -> np.ndarray:
            seen.append(batch.shape[0])
            hints.append(contended)
            return echo(batch)

        b = make_batcher(embed, max_batch=4, max_wait_s=30.0)  # a long wait that must not be needed
        b.start()
        b.begin_decode()  # request A decoding
        b.begin_decode()  # request B decoding
        a = b.submit(job(1).images, time.monotonic() + 60)
        b.end_decode()
        await asyncio.sleep(0.05)
        assert seen == []  # B is still decoding: A waits for it
        c = b.submit(job(1, tag=5).images, time.monotonic() + 60)
        b.end_decode()  # nothing else on its way: run now, not after 30 s
        await asyncio.wait_for(asyncio.gather(a.future, c.future), timeout=10)
        assert seen == [2] and hints == [False]  # nothing else waited for the CPU: all cores may serve it
        big = b.submit(job(6).images, time.monotonic() + 60)  # 4 now, 2 still queued while they run
        await asyncio.wait_for(big.future, timeout=10)
        assert seen[1:] == [4, 2] and hints[1:] == [True, False]
        await b.close(1.0)

    _run(main())


@pytest.mark.parametrize("instances", [1, 2])
def test_instances_bound_how_many_batches_run_at_once(instances: int) -> None:
    async def main() -> None:
        import threading

        lock = threading.Lock()
        active, peak = [0], [0]

        def embed(batch: np.ndarray, contended: bool = True) -> np.ndarray:
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.05)
            with lock:
                active[0] -= 1
            return echo(batch)

        b = make_batcher(embed, max_batch=2, max_wait_s=0.0, instances=instances,
                         executor=ThreadPoolExecutor(instances))
        b.start()
        # One request of 7 images spans 4 batches; its rows come back in order whatever finishes first.
        big = b.submit(job(7, tag=10).images, time.monotonic() + 5)
        small = [b.submit(job(1, tag=100 * (i + 1)).images, time.monotonic() + 5) for i in range(3)]
        np.testing.assert_array_equal((await big.future)[:, 0], 10 + np.arange(7))
        for i, j in enumerate(small):
            np.testing.assert_array_equal((await j.future)[:, 0], [100 * (i + 1)])
        assert peak[0] == instances
        assert b.running == 0 and b.queued_images == 0
        await b.close(1.0)

    _run(main())


def test_a_failing_batch_fails_only_its_requests_with_concurrent_instances() -> None:
    async def main() -> None:
        def embed(batch: np.ndarray, contended: bool = True) -> np.ndarray:
            time.sleep(0.02)
            if (batch[:, 0, 0, 0] == 666).any():
                raise RuntimeError("poisoned")
            return echo(batch)

        b = make_batcher(embed, max_batch=1, max_wait_s=0.0, instances=2, executor=ThreadPoolExecutor(2))
        b.start()
        jobs = [b.submit(job(1, tag=t).images, time.monotonic() + 5) for t in (1, 666, 3, 4)]
        results = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        assert isinstance(results[1], ApiError) and results[1].status == 500
        assert [r[0, 0] for i, r in enumerate(results) if i != 1] == [1, 3, 4]
        assert b.alive
        await b.close(1.0)

    _run(main())


def test_direct_claims_a_free_instance_only_while_nothing_queues() -> None:
    async def main() -> None:
        b = make_batcher(echo, instances=2, executor=ThreadPoolExecutor(2))
        b.start()
        assert b.claim_direct() is False  # idle server: uncontended, all cores for it
        assert b.claim_direct() is True  # the second instance, shared with the first request
        assert b.claim_direct() is None  # both instances taken: the batched path
        b.release_direct()
        b.begin_decode()
        assert b.claim_direct() is None  # another request decoding: it will queue, so join the batch
        b.end_decode()
        b.release_direct()
        b.running = 1  # a batch in the backend
        assert b.claim_direct() is True
        b.release_direct()
        b.running = 0
        await b.close(1.0)
        assert b.claim_direct() is None  # closing: no new work

    _run(main())


def test_a_batch_does_not_wait_for_company_while_another_instance_is_free() -> None:
    async def main() -> None:
        seen: list[int] = []

        def embed(batch: np.ndarray, contended: bool = True) -> np.ndarray:
            seen.append(batch.shape[0])
            return echo(batch)

        b = make_batcher(embed, max_batch=4, max_wait_s=30.0, instances=2, executor=ThreadPoolExecutor(2))
        b.start()
        b.begin_decode()
        b.begin_decode()  # another request is still decoding
        a = b.submit(job(1).images, time.monotonic() + 60)
        b.end_decode()
        await asyncio.wait_for(a.future, timeout=5)  # ran at once on the free instance, not after 30 s
        assert seen == [1]
        b.end_decode()
        await b.close(1.0)

    _run(main())
