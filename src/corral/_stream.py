"""What flows to the caller while a job runs: a stream's items (``iterate``) and the
task's reports (``corral.report``). Both are buffers in the event loop that one consumer
reads in order; neither does I/O.

A stream is bounded by credit: the worker may send only ``window`` items beyond those the
consumer has taken, and the consumer grants more as it takes them, half a window at a
time, so neither side ever holds more than about a window of items however slow the
consumer is.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")

# Items a stream may run ahead of its consumer: enough to keep a fast consumer fed across a
# round trip, few enough that the buffered items stay small.
WINDOW = 4096


class _Waitable:
    """A buffer whose single consumer can wait for more."""

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter


class ItemStream(_Waitable):
    """The items of one stream that the consumer has not taken yet."""

    def __init__(self, window: int = WINDOW) -> None:
        super().__init__()
        self.window = window
        self.items: deque[Any] = deque()
        self.released = False  # set at the first items: the stream has started, its slot is free
        self.grant: Callable[[int], None] | None = None  # tells the worker: n more

    def feed(self, items: list[Any]) -> None:
        self.items.extend(items)
        self.wake()


class Reports(_Waitable):
    """The reports of one job, kept for ``job.reports()``, and its report callbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.items: deque[Any] = deque()
        self.callbacks: list[Callable[[Any], object]] = []

    def add(self, obj: Any) -> None:
        for callback in self.callbacks:
            callback(obj)
        self.items.append(obj)
        self.wake()

    async def read(self, done: Callable[[], bool]) -> AsyncIterator[Any]:
        """Yield reports in order, then end once the job is done."""
        items = self.items
        while True:
            while items:
                yield items.popleft()
            if done():
                return
            await self._wait()


class StreamJob(Protocol):
    """What a ``StreamIterator`` uses of its job (a ``Job``): its stream and future, and
    its end. A protocol, not the class, so that streams sit below the jobs that hold them."""

    @property
    def stream(self) -> ItemStream | None: ...

    @property
    def future(self) -> asyncio.Future[Any]: ...

    def done(self) -> bool: ...

    def result(self) -> Any: ...

    def cancel(self) -> bool: ...


class StreamIterator(Generic[T]):
    """What ``iterate`` returns: the async iterator of a stream job's items.

    Dropping it (breaking out of ``async for``), ``aclose()``, leaving ``async with``, or
    the consumer's task being cancelled while it waits for an item cancels the job, which
    closes the generator in the worker; the iteration is over then, as an async
    generator's is after ``aclose()``.
    """

    def __init__(self, job: StreamJob) -> None:
        stream = job.stream
        assert stream is not None
        self.job = job
        self._stream = stream
        self._items = stream.items
        self._half = max(1, stream.window // 2)  # items taken between two grants
        self._taken = 0
        self._closed = False  # by its consumer: the items it did not take are dropped
        self._loop = job.future.get_loop()
        # The stream, not self: the job must not keep this iterator alive, since dropping
        # it is what closes an abandoned stream.
        job.future.add_done_callback(lambda _: stream.wake())

    def __aiter__(self) -> StreamIterator[T]:
        return self

    async def __anext__(self) -> T:
        items = self._items
        if not items:
            await self._more()
        taken = self._taken + 1
        if taken >= self._half:
            self._grant(taken)
        else:
            self._taken = taken
        item: T = items.popleft()
        return item

    def _check_loop(self) -> None:
        """Refuse to wait for items, or to grant credit, on any loop but the pool's: the
        items would never come there, nor the credit reach the worker."""
        loop = self._loop
        if asyncio.get_running_loop() is not loop:
            why = "its event loop is closed" if loop.is_closed() else "it belongs to another"
            raise RuntimeError(f"cannot iterate over this stream: {why} event loop")

    async def _more(self) -> None:
        """Wait until items arrive; at the end, raise the stream's error or stop."""
        self._check_loop()
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            if self.job.done():
                self.job.result()  # raises the stream's error, or CancelledError
                raise StopAsyncIteration
            try:
                await self._stream._wait()
            except BaseException:
                # The consumer was cancelled while it waited: the stream ends now, as at a
                # ``break``. Left to the garbage collector, the generator would run on
                # while anything (the task's traceback) keeps this iterator alive.
                self.close()
                raise

    def _grant(self, taken: int) -> None:
        """Tell the worker the consumer took taken more items (checked before any count
        changes, so a refused call takes nothing)."""
        grant = self._stream.grant
        if grant is None:  # no item has arrived yet: nothing to grant
            self._taken = taken
            return
        self._check_loop()
        grant(taken)
        self._taken = 0

    async def aclose(self) -> None:
        """Stop the stream: the generator in the worker is closed."""
        self.close()

    def close(self) -> None:
        """Stop the stream (see ``aclose``); the items not taken yet are dropped."""
        self._closed = True
        self._items.clear()
        if not self.job.done():
            self.job.cancel()

    async def __aenter__(self) -> StreamIterator[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Reached when the consumer drops the iterator. Once its loop has closed nothing
        # can be done: the job's future and its worker's callbacks belong to that loop.
        if not self._loop.is_closed():
            self.close()
