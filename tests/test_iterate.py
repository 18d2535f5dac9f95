"""``iterate``: a generator run in a worker, its items streamed back under credit, with
bounded memory on both sides, interleaving with other work, and every way a stream ends."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from pathlib import Path

import psutil
import pytest

import corral
from corral.workers import LocalWorker
from tests import tasks
from tests.waits import bounded, until


async def test_items_arrive_in_order() -> None:
    async with corral.Pool(1) as pool:
        items = [x async for x in pool.iterate(tasks.count_up, 50_000)]
        assert items == list(range(50_000))
        assert [x async for x in pool.iterate(range, 0)] == []
        assert [x async for x in pool.iterate(list, "abc")] == ["a", "b", "c"]


@pytest.mark.loops("asyncio")
@pytest.mark.timeout(180)
async def test_ten_million_items_consumed_slowly_keep_memory_bounded() -> None:
    """10,000,000 small items, the consumer pausing now and then: neither the parent's nor
    the worker's resident memory grows by more than a few MB (a list of them would take
    hundreds)."""
    async with corral.Pool(1) as pool:
        (worker,) = pool.workers
        assert worker.pid is not None
        child = psutil.Process(worker.pid)
        parent = psutil.Process()
        stream = pool.iterate(tasks.count_up, 10_000_000)
        count = 0
        base_parent = base_child = 0
        peak_parent = peak_child = 0
        async for x in stream:
            assert x == count
            count += 1
            if count % 1_000_000 == 0:
                await asyncio.sleep(0.1)  # a slow consumer: the worker must wait, not buffer
                rss_parent, rss_child = parent.memory_info().rss, child.memory_info().rss
                if count == 1_000_000:
                    base_parent, base_child = rss_parent, rss_child
                peak_parent = max(peak_parent, rss_parent)
                peak_child = max(peak_child, rss_child)
        assert count == 10_000_000
    assert peak_parent - base_parent < 20 * 2**20
    assert peak_child - base_child < 20 * 2**20


@pytest.mark.parametrize("kind", ["process", "thread", "local"])
async def test_two_streams_and_calls_interleave_on_one_worker(kind: str) -> None:
    """On a single worker of each kind, two open streams wait for their consumer while
    ordinary calls run; then both streams finish, every item in order."""
    async with corral.Pool(1, kind=kind) as pool:  # type: ignore[arg-type]
        first = pool.iterate(tasks.count_up, 20_000, window=100)
        second = pool.iterate(tasks.count_up, 20_000, window=100)
        assert await bounded(anext(first)) == 0
        assert await bounded(anext(second)) == 0
        for i in range(20):  # both streams are open and parked: calls still run
            assert await bounded(pool.run(tasks.add, i, 1)) == i + 1
        a, b = [0], [0]
        done_a = done_b = False
        while not (done_a and done_b):  # alternate between them
            if not done_a:
                try:
                    a.append(await bounded(anext(first)))
                except StopAsyncIteration:
                    done_a = True
            if not done_b:
                try:
                    b.append(await bounded(anext(second)))
                except StopAsyncIteration:
                    done_b = True
        assert a == list(range(20_000))
        assert b == list(range(20_000))


async def test_break_closes_the_generator_in_the_worker(tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    async with corral.Pool(1) as pool:
        async for x in pool.iterate(tasks.count_up, None, str(marker)):
            if x == 10_000:
                break
        # The file exists a moment before its line is written: wait for the line.
        await until(lambda: marker.exists() and marker.read_text().endswith("\n"))
        (worker,) = pool.workers
        assert marker.read_text() == f"closed {worker.pid}\n"
        assert await bounded(pool.run(tasks.add, 2, 3)) == 5  # the worker serves on
        await until(lambda: pool.stats().in_flight == 0)


async def test_aclose_and_cancelling_the_consumer_close_the_generator(tmp_path: Path) -> None:
    async with corral.Pool(1) as pool:
        first = tmp_path / "first"
        stream = pool.iterate(tasks.count_up, None, str(first))
        await bounded(anext(stream))
        await stream.aclose()
        await until(first.exists)
        with pytest.raises(StopAsyncIteration):  # ended, its buffered items dropped
            await bounded(anext(stream))

        second = tmp_path / "second"

        streaming = asyncio.Event()

        async def consume() -> None:
            async for _ in pool.iterate(tasks.count_up, None, str(second)):
                streaming.set()
                await asyncio.sleep(0)

        task = asyncio.ensure_future(consume())
        await bounded(streaming.wait())  # the generator runs in the worker
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await until(second.exists)


@pytest.mark.parametrize("kind", ["process", "thread", "local"])
async def test_cancelling_a_consumer_waiting_for_an_item_closes_the_stream_at_once(
    kind: str, tmp_path: Path
) -> None:
    """Cancelling the task that waits for a stream's next item cancels its job at once and
    closes the generator in the worker (its ``finally`` runs), on every kind of worker,
    although the iterator is still referenced (here by the test, as a caller's frame or
    a traceback may keep it); the worker serves on."""
    marker = tmp_path / "closed"
    async with corral.Pool(1, kind=kind) as pool:  # type: ignore[arg-type]
        stream = pool.iterate(tasks.count_up, None, str(marker), window=16)
        taken = asyncio.Event()

        async def consume() -> None:
            async for _ in stream:  # nothing awaited here: it waits only for items
                taken.set()

        consumer = asyncio.create_task(consume())
        await bounded(taken.wait())  # so the consumer now waits inside the stream
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await bounded(consumer)
        cancelled = stream.job.cancelled()
        stream.job.cancel()  # if it was not, the endless stream would keep the pool open
        assert cancelled
        await until(lambda: marker.exists() and marker.read_text().endswith("\n"))
        assert await bounded(pool.run(tasks.add, 2, 3)) == 5
        await until(lambda: pool.stats().in_flight == 0)
        with pytest.raises(StopAsyncIteration):  # ended, its buffered items dropped
            await bounded(anext(stream))


def test_an_open_stream_dropped_after_its_loop_closed_is_let_go_quietly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An iterator of an open stream that outlives its event loop (the program kept it)
    is let go quietly when it is dropped: its ``__del__`` no longer tries to stop the job
    through the closed loop and fail with "Event loop is closed"."""
    kept: list[corral.StreamIterator[int]] = []

    async def main() -> None:
        queue = corral.TaskQueue()
        await bounded(queue.attach(LocalWorker()))
        stream = queue.iterate(tasks.count_up)
        assert await bounded(anext(stream)) == 0
        kept.append(stream)

    with asyncio.Runner() as runner:
        runner.run(main())
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    kept.clear()
    gc.collect()
    assert not unraisable


async def test_exception_mid_stream_reaches_the_consumer_at_that_item() -> None:
    async with corral.Pool(1) as pool:
        got: list[int] = []
        with pytest.raises(tasks.TaskError, match="failed after 5000 items") as info:
            async for x in pool.iterate(tasks.count_then_fail, 5000):
                got.append(x)
        assert got == list(range(5000))
        assert isinstance(info.value.__cause__, corral.RemoteTraceback)
        assert "count_then_fail" in str(info.value.__cause__)


async def test_worker_lost_mid_stream_ends_it_with_worker_lost_error() -> None:
    async with corral.Pool(1) as pool:
        got: list[int] = []
        with pytest.raises(corral.WorkerLostError) as info:
            async for x in pool.iterate(tasks.count_then_die, 3000):
                got.append(x)
        # Every batch sent before the death arrives; the batch it died making is lost.
        assert got == list(range(len(got)))
        assert 0 < len(got) < 3000
        assert info.value.exitcode == 3
        assert await bounded(pool.run(tasks.add, 1, 1)) == 2  # replaced


async def test_a_call_that_returns_no_iterable_is_a_clear_error() -> None:
    async with corral.Pool(1) as pool:
        with pytest.raises(
            TypeError, match="iterate\\(\\) needs not_iterable to return an iterable"
        ):
            async for _ in pool.iterate(tasks.not_iterable):
                pass


async def test_bad_window_is_refused_at_the_call() -> None:
    async with corral.Pool(1) as pool:
        for bad in (0, 1, 2.5, True):
            with pytest.raises(ValueError, match="window"):
                pool.iterate(tasks.count_up, 10, window=bad)  # type: ignore[arg-type]


async def test_a_recycled_worker_finishes_its_open_stream_first() -> None:
    """A worker holding an open stream runs its last job under max_tasks_per_child and is
    retired, but it is stopped only after the stream ends: every item arrives."""
    async with corral.Pool(1, max_tasks_per_child=2) as pool:
        (worker,) = pool.workers
        stream = pool.iterate(tasks.count_up, 30_000, window=64)
        first = await bounded(anext(stream))
        assert await bounded(pool.run(tasks.pid)) == worker.pid  # its last job: retired
        rest = [x async for x in stream]
        assert [first, *rest] == list(range(30_000))
