"""Streams (``iterate``) held by thread and local workers: the live iterator, its credit,
and the turns it takes with the worker's other jobs.

A process child does the same behind its pipes (``corral._child``); a thread or local
worker hands each batch to its host directly. Either way a stream is served one batch at a
time, between the worker's other jobs, so one waiting for its consumer never holds the
worker::

    fn(*args) -> open_iterator()    Stream(job, iterator): job.stream.window items of credit
    a turn     -> produce(limit)    Batch(items, ended, error): job_items, then job_done
    credit(n)  -> credit += n       the consumer took n items: n more may be made
    cancel     -> closing = True    its next turn is shut(): the generator's finally runs

Nothing here locks, schedules or calls the host: the thread worker uses it under its own
lock where the loop shares the state, the local worker from the loop's callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any, NamedTuple

from .._child import next_batch_size  # one batching rule for every kind
from .._wire import describe

if TYPE_CHECKING:
    from .._job import Job


def open_iterator(fn: object, value: Any) -> Iterator[Any]:
    """The iterator over what fn returned; ``TypeError`` naming fn when it is no iterable."""
    try:
        return iter(value)
    except TypeError as exc:
        raise TypeError(f"iterate() needs {describe(fn)} to return an iterable: {exc}") from exc


class Batch(NamedTuple):
    """One turn of a stream: the items made, and whether the iterator ended or raised
    (after the items it made before that)."""

    items: list[Any]
    ended: bool
    error: BaseException | None


class Stream:
    """An open stream: the iterator a worker holds for a job, and what it may still send."""

    __slots__ = ("closed", "closing", "credit", "iterator", "job", "run_time", "size")

    def __init__(self, job: Job[Any], iterator: Iterator[Any], run_time: float) -> None:
        assert job.stream is not None
        self.job = job
        self.iterator = iterator
        self.credit = job.stream.window  # items it may send before the consumer takes any
        self.run_time = run_time  # seconds in the call and in the iterator so far
        self.closing = False  # cancelled: its next turn closes it
        self.closed = False  # its iterator was closed: once is enough
        self.size = 1  # items per batch: grows while the generator is fast

    def limit(self) -> int:
        """How many items its next batch may hold: what its credit allows, up to its batch
        size."""
        return min(self.credit, self.size)

    def produce(self, limit: int) -> Batch:
        """Make up to limit items. As in a process child, the batch size adapts: it
        doubles (to ``BATCH_ITEMS``) while a batch takes under a quarter of
        ``BATCH_SECONDS`` and halves when one takes longer than that, so a fast generator's
        items travel a thousand at a time and a slow one's as they come."""
        items: list[Any] = []
        ended = False
        error: BaseException | None = None
        start = time.perf_counter()
        try:
            items.extend(islice(self.iterator, limit))  # keeps the items before a raise
            ended = len(items) < limit
        except BaseException as exc:
            error = exc
        elapsed = time.perf_counter() - start
        self.size = next_batch_size(self.size, elapsed)
        self.run_time += elapsed
        return Batch(items, ended, error)

    def shut(self) -> BaseException:
        """Close the iterator (a generator's ``finally`` runs) and return what the job ends
        with: ``CancelledError``, or what the clean-up raised."""
        start = time.perf_counter()
        try:
            close = None if self.closed else getattr(self.iterator, "close", None)
            self.closed = True
            if close is not None:
                close()
            error: BaseException = asyncio.CancelledError(
                f"the stream of job {self.job.id} was closed"
            )
        except BaseException as exc:
            error = exc
        self.run_time += time.perf_counter() - start
        return error

    def discard(self) -> None:
        """Close the iterator, ignoring what its clean-up raises (it failed already, or
        the worker is going)."""
        with contextlib.suppress(BaseException):
            self.shut()


class Streams:
    """A worker's open streams, in turn order, and whose turn is next: a stream's or the
    waiting jobs'. Like a process child, the worker alternates between one batch of a
    stream with credit and one waiting job, so neither starves the other."""

    def __init__(self) -> None:
        self._open: dict[Job[Any], Stream] = {}  # insertion order is turn order
        self._streams_turn = False

    def __len__(self) -> int:
        return len(self._open)

    def jobs(self) -> list[Job[Any]]:
        """The jobs of the open streams."""
        return list(self._open)

    def open_streams(self) -> list[Stream]:
        """The open streams, left registered."""
        return list(self._open.values())

    def get(self, job: Job[Any]) -> Stream | None:
        return self._open.get(job)

    def add(self, stream: Stream) -> None:
        self._open[stream.job] = stream

    def remove(self, job: Job[Any]) -> None:
        self._open.pop(job, None)

    def requeue(self, job: Job[Any]) -> None:
        """Its turn is over: to the back of the line."""
        stream = self._open.pop(job, None)
        if stream is not None:
            self._open[job] = stream

    def drain(self) -> list[Stream]:
        """Take every open stream out (the worker is going)."""
        streams = list(self._open.values())
        self._open.clear()
        return streams

    def waiting(self) -> bool:
        """Whether some stream has a turn to take: it is to be closed, or has credit."""
        return any(s.closing or s.credit > 0 for s in self._open.values())

    def choose(self, jobs_waiting: bool, *, ending: bool = False) -> Stream | None:
        """The stream to serve now, or None: take a waiting job (or, with none, wait).

        A stream to close goes first (closing is quick, and ends a job); then streams with
        credit and the waiting jobs take turns. ``ending`` (the worker is stopping and has
        no job waiting): only a stream to close takes a turn; the rest are closed as the
        worker goes."""
        ready = None
        for stream in self._open.values():
            if stream.closing:
                return stream
            if ready is None and stream.credit > 0:
                ready = stream
        if ending:
            return None
        if ready is None or (jobs_waiting and not self._streams_turn):
            self._streams_turn = True
            return None
        self._streams_turn = False
        return ready
