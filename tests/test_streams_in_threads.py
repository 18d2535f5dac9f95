"""``iterate`` and ``corral.report`` on thread and local workers, through a ``TaskQueue``
and a ``Pool``: the same semantics as on process workers (``test_iterate``,
``test_reports``), with the generator living in the worker thread or in the loop."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import psutil
import pytest

import corral
from corral._stream import WINDOW
from corral.workers._local import LocalWorker
from corral.workers._thread import ThreadWorker
from tests import tasks
from tests.test_reports import check_reported_in_order, collect
from tests.waits import bounded

T = TypeVar("T")
BOUND = 10.0
KINDS = ["thread", "local"]


async def wait_for(event: threading.Event) -> None:
    """Wait (bounded) for a threading.Event without blocking the loop."""
    assert await asyncio.to_thread(event.wait, BOUND)


@contextlib.asynccontextmanager
async def one_worker(kind: str, via: str = "pool") -> AsyncIterator[corral.TaskQueue]:
    """A queue with one worker of kind: a ``Pool(1, kind=...)``, or a ``TaskQueue`` with
    the worker attached."""
    if via == "pool":
        async with corral.Pool(1, kind=kind) as pool:  # type: ignore[arg-type]
            yield pool
        return
    async with corral.TaskQueue() as queue:
        worker = ThreadWorker() if kind == "thread" else LocalWorker()
        await bounded(queue.attach(worker))
        yield queue


# -- tasks (run in the worker's thread or the loop: nothing is pickled) ------------------


def count_up(
    n: int | None = None,
    closed: threading.Event | None = None,
    where: list[str] | None = None,
    produced: list[int] | None = None,
) -> Iterator[int]:
    """Yield 0, 1, 2, ... (n items, or forever), counting them in produced; when it ends,
    note the thread it ended in and set closed."""
    try:
        for i in range(n) if n is not None else itertools.count():
            if produced is not None:
                produced[0] += 1
            yield i
    finally:
        if where is not None:
            where.append(threading.current_thread().name)
        if closed is not None:
            closed.set()


async def async_report_each(n: int) -> str:
    for i in range(n):
        corral.report({"step": i})
        await asyncio.sleep(0)
    return "finished"


def report_and_count(n: int) -> Iterator[int]:
    for i in range(n):
        corral.report({"step": i})
        yield i


# -- streams -----------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["pool", "queue"])
@pytest.mark.parametrize("kind", KINDS)
async def test_items_arrive_in_order(kind: str, via: str) -> None:
    """Every item, in order, in batches bounded by the window; empty and non-generator
    iterables too."""
    async with one_worker(kind, via) as queue:
        items = [x async for x in queue.iterate(count_up, 50_000)]
        assert items == list(range(50_000))
        assert [x async for x in queue.iterate(count_up, 20, window=2)] == list(range(20))
        assert [x async for x in queue.iterate(range, 0)] == []
        assert [x async for x in queue.iterate(list, "abc")] == ["a", "b", "c"]


@pytest.mark.parametrize("kind", KINDS)
async def test_break_closes_the_generator_where_it_runs(kind: str) -> None:
    """Breaking out of the loop closes the generator: its finally runs, in the worker's
    thread (or the loop's), and the worker serves on with nothing left in flight."""
    closed, where = threading.Event(), list[str]()
    async with one_worker(kind, "queue") as queue:
        async for x in queue.iterate(count_up, None, closed, where):
            if x == 10_000:
                break
        await wait_for(closed)
        expected = "MainThread" if kind == "local" else "corral-"
        assert len(where) == 1 and where[0].startswith(expected)
        assert await bounded(queue.run(tasks.add, 2, 3)) == 5
        async with asyncio.timeout(BOUND):
            while queue.stats().in_flight:
                await asyncio.sleep(0.001)


@pytest.mark.parametrize("kind", KINDS)
async def test_exception_mid_stream_reaches_the_consumer_at_that_item(kind: str) -> None:
    """The items made before the exception arrive first, then the exception itself, with
    its own traceback; a call that returns no iterable is a clear TypeError."""
    async with one_worker(kind) as queue:
        got: list[int] = []
        with pytest.raises(tasks.TaskError, match="failed after 5000 items") as info:
            async for x in queue.iterate(tasks.count_then_fail, 5000):
                got.append(x)
        assert got == list(range(5000))
        assert "count_then_fail" in "".join(traceback.format_tb(info.tb))
        with pytest.raises(TypeError, match=r"iterate\(\) needs not_iterable to return an"):
            async for _ in queue.iterate(tasks.not_iterable):  # type: ignore[arg-type]
                pass
        assert await bounded(queue.run(tasks.add, 1, 1)) == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_calls_run_while_a_stream_with_credit_streams(kind: str) -> None:
    """A stream that always has credit (its consumer keeps up) does not starve the
    worker's queue: calls submitted meanwhile finish long before the stream does."""
    async with one_worker(kind) as queue:
        stream = queue.iterate(count_up, None)
        assert await bounded(anext(stream)) == 0
        calls = [queue.submit(tasks.add, i, i) for i in range(10)]
        async with asyncio.timeout(BOUND):
            async for _ in stream:
                if all(call.done() for call in calls):
                    break
        await stream.aclose()
        assert [call.result() for call in calls] == [2 * i for i in range(10)]


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("kind", KINDS)
async def test_a_long_stream_consumed_slowly_keeps_memory_bounded(kind: str) -> None:
    """2,000,000 items, the consumer pausing now and then: the generator never runs more
    than a window ahead of the consumer, and the process's memory stays flat (a list of
    the items would take tens of MB)."""
    produced = [0]
    parent = psutil.Process()
    async with one_worker(kind) as queue:
        count = base = peak = 0
        ahead = 0
        async for x in queue.iterate(count_up, 2_000_000, None, None, produced):
            assert x == count
            count += 1
            if count % 200_000 == 0:
                await asyncio.sleep(0.05)  # a slow consumer: the worker must wait, not buffer
                ahead = max(ahead, produced[0] - count)
                rss = parent.memory_info().rss
                base = base or rss
                peak = max(peak, rss)
        assert count == 2_000_000
    assert ahead <= WINDOW
    assert peak - base < 20 * 2**20


@pytest.mark.parametrize("kind", KINDS)
async def test_detaching_a_worker_closes_its_open_streams(kind: str) -> None:
    """A worker stopped while a stream is open closes its generator (finally runs), as a
    process child does at EOF; the consumer gets the items sent, then WorkerLostError."""
    closed = threading.Event()
    async with corral.TaskQueue() as queue:
        worker = ThreadWorker() if kind == "thread" else LocalWorker()
        await bounded(queue.attach(worker))
        stream = queue.iterate(count_up, None, closed, window=10)
        assert await bounded(anext(stream)) == 0
        await bounded(queue.detach(worker))
        await wait_for(closed)
        with pytest.raises(corral.WorkerLostError, match="stopped with streams open"):
            async for x in stream:
                assert x < 10


# -- reports -----------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [tasks.report_each, async_report_each])
@pytest.mark.parametrize("kind", KINDS)
async def test_reports_arrive_in_order_and_before_the_result(
    kind: str, fn: Callable[[int], Any]
) -> None:
    """From a plain call or a coroutine: every report, in order, through job.reports()
    and job.on_report, all before the result."""
    async with one_worker(kind, "queue") as queue:
        await check_reported_in_order(queue.submit(fn, 300), 300)
        kept = queue.submit(fn, 3)  # reports sent before anyone reads are kept
        assert await bounded(kept) == "finished"
        assert await bounded(collect(kept)) == [{"step": i} for i in range(3)]


@pytest.mark.parametrize("kind", KINDS)
async def test_reports_from_a_generator_reach_its_job(kind: str) -> None:
    """A stream's generator reports to its job too, each before the items made after it;
    the worker then serves reporting calls as before."""
    async with one_worker(kind) as queue:
        stream = queue.iterate(report_and_count, 100)
        got: list[Any] = []
        stream.job.on_report(got.append)
        assert [x async for x in stream] == list(range(100))
        assert got == [{"step": i} for i in range(100)]
        assert await bounded(queue.run(tasks.report_each, 1)) == "finished"
