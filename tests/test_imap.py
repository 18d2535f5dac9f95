"""``imap`` (and the chunking it shares with ``map``), with real worker processes and
threads: results in order and as they finish, lazy reading of endless and async inputs,
cancellation of the jobs in flight when the consumer stops, errors at their position,
chunk sizes, and arguments refused at the call.

Every wait is bounded; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import pytest

import corral
import corral.workers
from corral._mapping import IN_FLIGHT_PER_WORKER, TARGET_CHUNK_SECONDS, ChunkSizer
from tests import tasks
from tests.waits import bounded, until

T = TypeVar("T")

BOUND = 60.0
KINDS = ["process", "thread"]
WORKERS = 2
WINDOW = max(2, IN_FLIGHT_PER_WORKER * WORKERS)  # chunks imap keeps ahead on 2 workers


async def collect(iterator: AsyncIterator[T], limit: int | None = None) -> list[T]:
    """The values of iterator (the first ``limit`` of them), within the bound."""

    async def run() -> list[T]:
        out: list[T] = []
        async for value in iterator:
            out.append(value)
            if limit is not None and len(out) == limit:
                break
        return out

    return await bounded(run())


def fail_on_37(x: int) -> int:
    """x + 1, except for 37, which raises (a task of this module, run by workers)."""
    if x == 37:
        raise tasks.TaskError(f"bad item {x}")
    return x + 1


class Counted:
    """An endless input that counts the items taken from it."""

    def __init__(self, start: int = 0) -> None:
        self.pulled = 0
        self._numbers = itertools.count(start)

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        self.pulled += 1
        return next(self._numbers)


def sleeps_after(quick: int, seconds: float = 1000.0) -> Iterator[float]:
    """Sleep durations for ``tasks.sleep``: ``quick`` zeros, then long sleeps forever."""
    yield from itertools.repeat(0.0, quick)
    yield from itertools.repeat(seconds)


# -- results -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_results_in_order_and_as_finished_for_100k_inputs(kind: str) -> None:
    """100,000 calls give every result: in input order by default, and all of them (each
    once) with ``ordered=False``; a generator, a range and a list all work."""
    n = 100_000
    expected = [i * i for i in range(n)]
    async with corral.Pool(WORKERS, kind=kind) as pool:
        assert await collect(pool.imap(tasks.square, range(n))) == expected
        assert await collect(pool.imap(tasks.square, (i for i in range(n)))) == expected
        unordered = await collect(pool.imap(tasks.square, list(range(n)), ordered=False))
        assert sorted(unordered) == expected


async def test_unordered_yields_a_fast_call_before_a_slow_earlier_one() -> None:
    """With ``ordered=False`` a call that finishes first is yielded first, even when it
    comes later in the input; in order, the slow call comes first."""
    async with corral.Pool(WORKERS) as pool:
        durations = [2.0, 0.0]
        got = await collect(pool.imap(tasks.sleep, durations, ordered=False, chunksize=1))
        assert got == [0.0, 2.0]
        got = await collect(pool.imap(tasks.sleep, durations, chunksize=1))
        assert got == [2.0, 0.0]


async def test_empty_input_and_coroutine_functions() -> None:
    """An empty input ends at once; a coroutine function's values are awaited in the
    worker, in input order."""
    async with corral.Pool(WORKERS, kind="thread") as pool:
        assert await collect(pool.imap(tasks.square, [])) == []
        got = await collect(pool.imap(tasks.async_square, range(50)))
        assert got == [i * i for i in range(50)]


async def test_async_iterable_input() -> None:
    """An async generator (one that awaits between items) is consumed as input, in order
    and unordered, and the pool's options pass through."""

    async def numbers(n: int) -> AsyncIterator[int]:
        for i in range(n):
            if i % 100 == 0:
                await asyncio.sleep(0)
            yield i

    async with corral.Pool(WORKERS) as pool:
        got = await collect(pool.imap(tasks.square, numbers(2000), priority=-1))
        assert got == [i * i for i in range(2000)]
        got = await collect(pool.imap(tasks.square, numbers(2000), ordered=False))
        assert sorted(got) == [i * i for i in range(2000)]


# -- laziness and stopping ---------------------------------------------------------------


async def test_input_is_read_lazily_within_the_window() -> None:
    """Nothing is read at the call; while the consumer is slow, the input is read at most
    a window of chunks ahead of it, even once every worker has gone idle."""
    chunksize = 3
    source = Counted()
    async with corral.Pool(WORKERS) as pool:
        iterator = pool.imap(tasks.square, source, chunksize=chunksize)
        assert source.pulled == 0
        ahead = (WINDOW + 1) * chunksize  # the taken chunk and the full window after it
        consumed = 0
        async for value in iterator:
            assert value == consumed * consumed
            consumed += 1
            assert source.pulled <= consumed + ahead
            if consumed % 25 == 0:
                # A slow consumer: the window's jobs all finish; nothing more is read.
                pulled = source.pulled
                await until(lambda: pool.stats().in_flight == 0)
                assert source.pulled == pulled
            if consumed == 200:
                break
        assert source.pulled <= consumed + ahead


@pytest.mark.parametrize("kind", KINDS)
async def test_endless_input_and_break(kind: str) -> None:
    """An endless generator works; breaking out of the loop cancels the jobs in flight at
    once (sleeping jobs that would run for 1000 s), and the pool serves on."""
    async with corral.Pool(WORKERS, kind=kind) as pool:
        n = 0
        async for value in pool.imap(tasks.square, itertools.count()):
            assert value == n * n
            n += 1
            if n == 20_000:
                break
        sleeping = pool.imap(tasks.sleep, sleeps_after(1), chunksize=1)
        assert await bounded(anext(sleeping)) == 0.0
        assert pool.stats().in_flight > 0  # long sleeps are running or queued
        await bounded(sleeping.aclose())
        await until(lambda: pool.stats().in_flight == 0)
        assert await bounded(pool.run(tasks.add, 1, 2)) == 3


async def test_aclose_and_async_with_cancel_the_jobs_in_flight() -> None:
    """``aclose()`` and leaving ``async with`` stop the imap: its jobs are cancelled and
    the iteration ends."""
    async with corral.Pool(WORKERS) as pool:
        iterator = pool.imap(tasks.sleep, sleeps_after(1), chunksize=1)
        assert await bounded(anext(iterator)) == 0.0
        assert pool.stats().in_flight > 0
        await iterator.aclose()
        await until(lambda: pool.stats().in_flight == 0)
        with pytest.raises(StopAsyncIteration):
            await bounded(anext(iterator))

        async with pool.imap(tasks.sleep, sleeps_after(1), chunksize=1) as stream:
            assert await bounded(anext(stream)) == 0.0
        await until(lambda: pool.stats().in_flight == 0)


@pytest.mark.parametrize("kind", ["process", "thread", "local"])
async def test_cancelling_the_consumer_cancels_the_jobs_in_flight(kind: str) -> None:
    """Cancelling the task that iterates (while it waits for a value) cancels every job
    of the imap at once, on every kind of worker, even though the task keeps the iterator
    referenced."""
    # A local worker runs its calls in the loop: a long sleep there must be a coroutine.
    sleep = tasks.sleep if kind == "process" else tasks.async_sleep
    async with corral.Pool(WORKERS, kind=kind) as pool:  # type: ignore[arg-type]
        started = asyncio.Event()
        iterator = pool.imap(sleep, sleeps_after(1), chunksize=1)

        async def consume() -> None:
            async for _ in iterator:
                started.set()

        consumer = asyncio.create_task(consume())
        await bounded(started.wait())
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await bounded(consumer)
        await until(lambda: pool.stats().in_flight == 0)
        assert await bounded(pool.run(tasks.add, 2, 2)) == 4


# -- errors ------------------------------------------------------------------------------


async def test_error_raised_at_its_position_when_ordered() -> None:
    """In order, the values before the failing call come first and then its exception,
    with its own type; with chunks, every chunk before the failing one is yielded."""
    async with corral.Pool(WORKERS) as pool:
        for chunksize, yielded in [(1, 37), (10, 30), (None, None)]:
            got: list[int] = []
            with pytest.raises(tasks.TaskError, match="bad item 37"):
                async for value in pool.imap(fail_on_37, range(1000), chunksize=chunksize):
                    got.append(value)
            assert got == list(range(1, len(got) + 1))
            if yielded is not None:
                assert len(got) == yielded
            await until(lambda: pool.stats().in_flight == 0)
        assert await bounded(pool.run(tasks.add, 1, 1)) == 2


async def test_error_raised_when_it_arrives_unordered() -> None:
    """Unordered, the exception is raised when its chunk arrives; the values yielded
    before it are right, and the slow jobs still in flight are cancelled."""

    def inputs() -> Iterator[Any]:
        yield 37
        yield from sleeps_after(0)

    async with corral.Pool(WORKERS) as pool:
        iterator = pool.imap(_fail_or_sleep, inputs(), ordered=False, chunksize=1)
        with pytest.raises(tasks.TaskError, match="bad item 37"):
            await collect(iterator)
        await until(lambda: pool.stats().in_flight == 0)


def _fail_or_sleep(x: float) -> float:
    if x == 37:
        raise tasks.TaskError("bad item 37")
    return tasks.sleep(x)


async def test_error_in_the_input_comes_after_the_values_before_it() -> None:
    """An input that raises ends the imap with its exception, after the values of every
    item it gave before failing."""

    def broken() -> Iterator[int]:
        yield from range(5)
        raise KeyError("the input broke")

    async def broken_async() -> AsyncIterator[int]:
        for i in range(5):
            yield i
        raise KeyError("the input broke")

    async with corral.Pool(WORKERS) as pool:
        for source in (broken(), broken_async()):
            got: list[int] = []
            with pytest.raises(KeyError, match="the input broke"):
                async for value in pool.imap(tasks.square, source, chunksize=1):
                    got.append(value)
            assert got == [0, 1, 4, 9, 16]


# -- chunks ------------------------------------------------------------------------------


async def test_explicit_and_automatic_chunks() -> None:
    """``chunksize`` fixes the number of jobs; automatic chunks share 100,000 no-op calls
    among few jobs (not one each) for a sized input and an endless one alike."""
    async with corral.Pool(WORKERS) as pool:
        before = pool.stats().calls
        assert await collect(pool.imap(tasks.square, range(100), chunksize=10)) == [
            i * i for i in range(100)
        ]
        await until(lambda: pool.stats().calls == before + 10)

        for source in (range(100_000), itertools.count()):
            before = pool.stats().calls
            got = await collect(pool.imap(tasks.square, source), limit=100_000)
            assert got == [i * i for i in range(100_000)]
            await until(lambda: pool.stats().in_flight == 0)
            assert pool.stats().calls - before < 200


def test_chunk_sizes_grow_toward_the_target_and_shrink_for_slow_calls() -> None:
    """The automatic size starts at 1, at most doubles per measured chunk, stops at the
    size that runs for the target time, never passes its cap, and shrinks at once when
    calls get slower; a fixed size never changes."""
    sizer = ChunkSizer(None, cap=1000)
    assert sizer.size == 1
    sizes = []
    for _ in range(15):
        sizer.observe(sizer.size, sizer.size * 1e-6)  # 1 µs a call
        sizes.append(sizer.size)
    assert sizes[:5] == [2, 4, 8, 16, 32]
    assert sizes[-1] == 1000  # the cap, below the 20,000 the target would allow
    sizer.observe(1000, 1000 * 0.004)  # now 4 ms a call: 5 of them fill the target
    assert sizer.size == round(TARGET_CHUNK_SECONDS / 0.004)
    sizer.observe(5, 5.0)  # 1 s a call
    assert sizer.size == 1
    sizer.observe(1, None)  # unmeasured: doubling only
    assert sizer.size == 2

    fixed = ChunkSizer(7)
    fixed.observe(7, 100.0)
    assert fixed.size == 7


# -- bad arguments -----------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [0, -1, 1.5, True, "10"])
async def test_bad_chunksize_is_refused_at_the_call(chunksize: Any) -> None:
    """A chunksize that is not a positive int raises ValueError at the call, before any
    iteration (imap) or at the await (map), naming the value."""
    async with corral.Pool(1, kind="thread") as pool:
        with pytest.raises(ValueError, match="chunksize must be a positive int"):
            pool.imap(tasks.square, range(3), chunksize=chunksize)
        with pytest.raises(ValueError, match="chunksize must be a positive int"):
            await bounded(pool.map(tasks.square, range(3), chunksize=chunksize))


async def test_other_bad_arguments_are_refused_at_the_call() -> None:
    """A progress value that is none of the choices, an input that is not iterable and a
    function that is not callable all raise at the call, and nothing is read."""
    source = Counted()
    async with corral.Pool(1, kind="thread") as pool:
        with pytest.raises(ValueError, match=r"progress must be .*'sometimes'"):
            pool.imap(tasks.square, source, progress="sometimes")
        with pytest.raises(ValueError, match="progress must be"):
            await bounded(pool.map(tasks.square, range(3), progress="sometimes"))
        with pytest.raises(TypeError, match="iterable or an async iterable"):
            pool.imap(tasks.square, 42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="must be callable"):
            pool.imap(42, source)  # type: ignore[arg-type]
        assert source.pulled == 0


async def test_bad_options_are_refused_at_the_imap_call() -> None:
    """Options are checked when imap is called, not at the first item."""
    async with corral.TaskQueue() as queue:
        await asyncio.wait_for(queue.attach(corral.workers.ThreadWorker(series=["io"])), 30)
        with pytest.raises(ValueError, match="retries"):
            queue.imap(tasks.square, range(3), retries=-1)
        with pytest.raises(ValueError, match="series='gpu'"):
            queue.imap(tasks.square, range(3), series="gpu")
    with pytest.raises(corral.PoolClosedError):
        queue.imap(tasks.square, range(3))
