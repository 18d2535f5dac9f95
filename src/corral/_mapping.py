"""Many calls of one function: ``map`` and ``imap`` cut their input into chunks, one job
each, so the per-job cost (a pickle, a frame, a round trip) is shared by many small calls.

``map`` knows its whole input: it cuts it into about ``CHUNKS_PER_WORKER`` chunks per
worker at once and gathers them. ``imap`` may not know its input's length, or may never
reach its end, so it reads it lazily, a chunk at a time, and keeps a bounded window of
chunks in flight:

    input ──read a chunk──▶ submit(call_each, fn, chunk) ──▶ workers
      ▲                                                          │
      └── a slot frees when the consumer takes a chunk ◀── chunk's values, in input
          order (ordered) or as they finish (unordered)

Its chunks start at one call and grow, from the run time of the chunks already done,
toward ``TARGET_CHUNK_SECONDS`` each (unless ``chunksize`` fixes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import math
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sized,
)
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._checks import check_count
from ._progress import ProgressBar, open_bar, wants_bar
from ._wire import describe

if TYPE_CHECKING:
    from ._job import Job

T = TypeVar("T")

# map() cuts its input into about this many chunks per worker: enough for the workers to
# balance uneven chunks, few enough that per-job overhead vanishes for tiny calls.
CHUNKS_PER_WORKER = 4

# imap keeps at most this many chunks per worker submitted and not yet taken by the consumer
# (and at least 2): one running on each worker and one queued to replace it the moment it
# finishes, so no worker waits a round trip through the consumer for its next chunk. More
# would only read the input further ahead and hold more results in memory; fewer would leave
# a worker idle between chunks. In ordered mode a slow chunk at the head holds the window:
# the workers idle rather than pile up results the consumer cannot take yet.
IN_FLIGHT_PER_WORKER = 2

# imap's automatic chunks grow toward this run time each: long enough that a job's overhead
# (tens of microseconds for a process round trip) stays under about 1% of its chunk, short
# enough that results stream out many times a second and a stopped imap wastes little work.
TARGET_CHUNK_SECONDS = 0.02

# The largest automatic imap chunk when the input's length is unknown: it bounds the inputs
# read ahead and the values held for one chunk when each call costs next to nothing.
MAX_CHUNKSIZE = 1 << 16


@dataclass(frozen=True, slots=True)
class Queue:
    """What map and imap use of the queue they serve, handed over by it (a ``TaskQueue``):
    its ``submit``, how many workers it has, and its check that a call comes from its own
    event loop. Given, not imported, so that mapping sits below the queue that offers it."""

    submit: Callable[..., Job[Any]]
    worker_count: Callable[[], int]  # serving now, or about to start: what chunks divide by
    check_loop: Callable[[str], asyncio.AbstractEventLoop]  # RuntimeError off its loop


def call_each(fn: Callable[[Any], Any], items: Iterable[Any]) -> Any:
    """Run fn on each item of a chunk, in a worker of any kind. For a coroutine function
    it returns one coroutine awaiting them in turn, which the worker runs as it runs any
    coroutine (in the loop, on the thread's loop, or on the child's)."""
    if inspect.iscoroutinefunction(fn):
        # Each coroutine is made as it is awaited: one cancelled before it starts leaves
        # none behind never awaited (and warned about).
        return _await_each(fn, items)
    results = [fn(item) for item in items]
    if results and inspect.iscoroutine(results[0]):  # a plain function returning them
        return _await_made(results)
    return results


async def _await_each(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    return [await fn(item) for item in items]


async def _await_made(coroutines: list[Coroutine[Any, Any, Any]]) -> list[Any]:
    try:
        return [await c for c in coroutines]
    finally:
        # Cancelled or failed part-way: the rest were never awaited; closed, they go
        # without a "never awaited" warning (closing one that ended does nothing).
        for c in coroutines:
            c.close()


def auto_chunksize(n: int, workers: int) -> int:
    """Chunk size for n calls over workers: about ``CHUNKS_PER_WORKER`` chunks each."""
    return max(1, math.ceil(n / (max(1, workers) * CHUNKS_PER_WORKER)))


async def map_list(
    queue: Queue,
    fn: Callable[[Any], Any],
    iterable: Iterable[Any],
    *,
    chunksize: int | None,
    options: dict[str, Any],
    progress: bool | str,
) -> list[Any]:
    """``TaskQueue.map``."""
    check_count("chunksize", chunksize, optional=True)
    show_bar = wants_bar(progress)
    items = list(iterable)
    if not items:
        return []
    size = chunksize or auto_chunksize(len(items), queue.worker_count())
    if not show_bar:
        return await map_jobs(queue.submit, fn, items, size, options)
    bar = open_bar(len(items), f"map {describe(fn)}")
    try:
        return await map_jobs(queue.submit, fn, items, size, options, bar=bar)
    finally:
        bar.close()


async def map_jobs(
    submit: Callable[..., Job[Any]],
    fn: Callable[[Any], Any],
    items: list[Any],
    size: int,
    options: dict[str, Any],
    *,
    bar: ProgressBar | None = None,
) -> list[Any]:
    """Submit fn over items in chunks of size and gather the values in input order; the
    first exception cancels the rest of the map and is raised. ``bar`` advances as each
    chunk completes."""
    jobs: list[Job[Any]]
    if size == 1:
        jobs = [submit(fn, x, **options) for x in items]
    else:
        jobs = [
            submit(call_each, fn, items[i : i + size], **options)
            for i in range(0, len(items), size)
        ]
    if bar is not None:
        for i, job in enumerate(jobs):  # the last chunk may be short
            calls = min(size, len(items) - i * size)
            job.future.add_done_callback(functools.partial(_advance, bar, calls))
    try:
        parts = await asyncio.gather(*(job.future for job in jobs))
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    if size == 1:
        return parts
    return [value for part in parts for value in part]


def _advance(bar: ProgressBar, n: int, future: asyncio.Future[Any]) -> None:
    """Done callback of a chunk's job: count its n calls if they all succeeded."""
    if not future.cancelled() and future.exception() is None:
        bar.update(n)


def imap_items(
    queue: Queue,
    fn: Callable[[Any], Any],
    iterable: Iterable[Any] | AsyncIterable[Any],
    *,
    ordered: bool,
    chunksize: int | None,
    options: dict[str, Any],
    progress: bool | str,
) -> MapIterator[Any]:
    """``TaskQueue.imap``: checks every argument now, reads nothing yet, and returns the
    ``MapIterator`` that does the work as it is iterated."""
    check_count("chunksize", chunksize, optional=True)
    if not callable(fn):
        raise TypeError(f"the function to map must be callable, not {fn!r}")
    show_bar = wants_bar(progress)
    source: Iterator[Any] | AsyncIterator[Any]
    if isinstance(iterable, AsyncIterable):
        source = aiter(iterable)
    else:
        try:
            source = iter(iterable)
        except TypeError:
            raise TypeError(
                f"imap needs an iterable or an async iterable, not {describe(iterable)}"
            ) from None
    total = len(iterable) if isinstance(iterable, Sized) else None
    cap = MAX_CHUNKSIZE
    if total is not None:  # no bigger than map's chunks: the workers still balance
        cap = min(cap, auto_chunksize(total, queue.worker_count()))
    return MapIterator(
        queue,
        fn,
        source,
        ordered=ordered,
        sizer=ChunkSizer(chunksize, cap),
        options=options,
        bar_total=total if show_bar else False,
    )


class ChunkSizer:
    """The size of imap's next chunk: fixed by ``chunksize``, or grown from 1 toward
    ``TARGET_CHUNK_SECONDS`` of run time per chunk.

    After each chunk is taken, the next size is the one that would have run for the target
    time at that chunk's measured time per call, but at most double the current size (one
    fast chunk proves little) and at most ``cap``. A chunk slower than the target shrinks
    the next at once. Pure arithmetic: no clock of its own, no I/O.
    """

    __slots__ = ("_cap", "_fixed", "size")

    def __init__(self, chunksize: int | None, cap: int = MAX_CHUNKSIZE) -> None:
        self._fixed = chunksize is not None
        self._cap = max(1, cap)
        self.size = chunksize or 1

    def observe(self, calls: int, seconds: float | None) -> None:
        """A chunk of calls ran for seconds (None: not measured by its worker)."""
        if self._fixed:
            return
        if seconds is None or seconds <= 0:
            ideal = self._cap  # unmeasured: grow by doubling alone
        else:
            ideal = int(calls * TARGET_CHUNK_SECONDS / seconds)
        self.size = max(1, min(2 * self.size, ideal, self._cap))


class _Arrivals:
    """The chunk jobs of an unordered imap that finished and were not taken yet, in the
    order they finished. The jobs' callbacks hold this, never the iterator: an iterator the
    consumer dropped must be collectable while its jobs run, since collecting it is what
    cancels them."""

    __slots__ = ("_waiter", "jobs")

    def __init__(self) -> None:
        self.jobs: deque[Job[Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def arrived(self, job: Job[Any]) -> None:
        self.jobs.append(job)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class MapIterator(Generic[T]):
    """What ``imap`` returns: the async iterator of fn's values over the input.

    Reading, submitting and taking happen only inside ``__anext__``, driven by the consumer:
    nothing runs in the background, so a consumer that stops taking values stops the input
    being read (at most the window of chunks ahead). Dropping the iterator (``break``),
    ``aclose()``, leaving ``async with``, an exception, or the consumer's task being
    cancelled while it waits for a value all close it: every job in flight is cancelled,
    the input is let go, and the progress bar is closed.

    A sync input is read in the event loop, a chunk at a time, so it should be quick to
    read (a list, a range, a generator over data in memory); one that waits for I/O should
    be an async iterable.
    """

    def __init__(
        self,
        queue: Queue,
        fn: Callable[[Any], Any],
        source: Iterator[Any] | AsyncIterator[Any],
        *,
        ordered: bool,
        sizer: ChunkSizer,
        options: dict[str, Any],
        bar_total: int | bool | None,
    ) -> None:
        self._queue = queue
        self._fn = fn
        self._source: Iterator[Any] | AsyncIterator[Any] | None = source  # None: all read
        self._ordered = ordered
        self._sizer = sizer
        self._options = options
        self._bar_total = bar_total  # False: no bar; else the bar's total (None: unknown)
        self._bar: ProgressBar | None = None
        self._jobs: deque[Job[Any]] = deque()  # ordered: submitted, not taken, input order
        self._pending: set[Job[Any]] = set()  # unordered: submitted, not taken
        self._arrivals = _Arrivals()  # unordered: finished, not taken
        self._values: deque[T] = deque()  # the taken chunk's values not yielded yet
        self._input_error: BaseException | None = None  # raised once the values before it
        self._closed = False

    def __aiter__(self) -> MapIterator[T]:
        return self

    async def __anext__(self) -> T:
        values = self._values
        if values:  # the hot path: the next value of a chunk already taken
            return values.popleft()
        # On another loop than the queue's, its jobs' values would never come: refused
        # before anything is submitted, and the imap stays usable on its own loop.
        self._queue.check_loop("iterate over imap")
        try:
            return await self._next_chunk()
        except BaseException:  # StopAsyncIteration too: the end closes it as well
            self.close()
            raise

    async def _next_chunk(self) -> T:
        """Take the next chunk (reading and submitting more input to refill the window)
        and return its first value."""
        if self._bar_total is not False:  # opened at the first value asked for, not before
            self._bar = open_bar(self._bar_total or None, f"imap {describe(self._fn)}")
            self._bar_total = False
        while not self._closed:
            await self._fill()
            job = await (self._next_in_order() if self._ordered else self._next_finished())
            if job is None:
                break
            values: list[T] = job.result()  # the chunk's error, or CancelledError
            self._sizer.observe(len(values), job.run_time)
            if self._bar is not None:  # counted when taken: the bar ends at what was yielded
                self._bar.update(len(values))
            await self._fill()  # refill the freed slot before the consumer goes through it
            self._values.extend(values)
            if self._values:
                return self._values.popleft()
        if self._input_error is not None:
            error, self._input_error = self._input_error, None
            raise error
        raise StopAsyncIteration

    def _outstanding(self) -> int:
        return len(self._jobs) if self._ordered else len(self._pending)

    async def _fill(self) -> None:
        """Read and submit chunks until the window is full or the input ends."""
        limit = max(2, IN_FLIGHT_PER_WORKER * self._queue.worker_count())
        while self._source is not None and not self._closed and self._outstanding() < limit:
            size = self._sizer.size
            chunk: list[Any] = []
            source = self._source
            try:
                if isinstance(source, Iterator):
                    # extend keeps the items it got before an error in the input
                    chunk.extend(islice(source, size))
                else:
                    for _ in range(size):
                        chunk.append(await anext(source))
            except StopAsyncIteration:
                pass
            except Exception as exc:  # the input itself failed: raised after what it gave
                self._input_error = exc
                self._source = None
            if len(chunk) < size:
                self._source = None
            if chunk and not self._closed:
                self._submit(chunk)

    def _submit(self, chunk: list[Any]) -> None:
        job = self._queue.submit(call_each, self._fn, chunk, **self._options)
        if self._ordered:
            self._jobs.append(job)
        else:
            self._pending.add(job)
            job.add_done_callback(self._arrivals.arrived)

    async def _next_in_order(self) -> Job[Any] | None:
        if not self._jobs:
            return None
        job = self._jobs[0]
        if not job.done():
            # Cancelling the consumer here cancels this job (and close() the rest).
            await asyncio.wait((job.future,))
        return self._jobs.popleft()

    async def _next_finished(self) -> Job[Any] | None:
        arrivals = self._arrivals
        while not arrivals.jobs:
            if not self._pending:
                return None
            await arrivals.wait()
        job = arrivals.jobs.popleft()
        self._pending.discard(job)
        return job

    def close(self) -> None:
        """Stop: cancel every job in flight, let go of the input, close the bar."""
        if self._closed:
            return
        self._closed = True
        self._source = None
        self._values.clear()
        jobs = [*self._jobs, *self._pending]
        self._jobs.clear()
        self._pending.clear()
        self._arrivals.jobs.clear()
        for job in jobs:
            if not job.cancel() and not job.cancelled():
                job.exception()  # a failure nobody will take: not "never retrieved"
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    async def aclose(self) -> None:
        """Stop the imap (see ``close``)."""
        self.close()

    async def __aenter__(self) -> MapIterator[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Reached when the consumer breaks out of ``async for`` and drops the iterator. A
        # loop already closed has no jobs left to cancel: its futures cannot be touched.
        if not self._closed:
            with contextlib.suppress(RuntimeError):
                self.close()
