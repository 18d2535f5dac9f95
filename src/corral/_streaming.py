"""The producing side of ``iterate``: the live iterator a worker holds for a generator
task, the batches it makes, the credit its consumer grants, and the turns it takes with
the worker's other work. Every worker kind runs its streams through this module: a
process child behind its pipes (``_child``), a thread or local worker in the parent
(``workers._thread``, ``workers._local``), and a Dask worker between pulls
(``workers._dask_remote``). What carries the batches (a frame, a host callback, a Dask
task's result) is theirs: nothing here pickles, locks, waits or writes. It runs the
iterator and decides:

    fn(*args) -> open_iterator()        LiveIterator(job, iterator, credit): held by the worker
    a turn    -> Turns.choose()         this stream's batch, or the next waiting job
              -> produce(limit())       Batch(items, ended, error): the worker sends it
              -> Turns.end_turn()       back of the line, or out when the batch was its last
    credit    -> Turns.grant(job, n)    the consumer took n items: n more may be made
    cancel    -> Turns.cancel(job)      its next turn shut()s it: the generator's finally runs

The parent's side of a stream, the items in transit to the caller, is ``corral._stream``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterator
from itertools import islice
from time import perf_counter
from typing import Any, Generic, NamedTuple, TypeVar

from ._wire import describe

K = TypeVar("K", bound=Hashable)  # what a worker knows a job by: its id, its Job, its key

# A batch holds at most BATCH_ITEMS items and should take about BATCH_SECONDS to make:
# large enough to share a batch's cost (a frame, a wake-up, a round trip) among many small
# items, short enough that a slow generator's items reach the consumer soon and that the
# worker's other streams and jobs soon have their turn.
BATCH_ITEMS = 1024
BATCH_SECONDS = 0.01


def next_batch_size(size: int, elapsed: float) -> int:
    """A stream's next batch size after a batch of size took elapsed seconds: double (up
    to ``BATCH_ITEMS``) under a quarter of ``BATCH_SECONDS``, halve above it. So a fast
    generator's items travel a thousand to a batch and a slow one's as they come, and no
    clock is read per item."""
    if elapsed < BATCH_SECONDS / 4:
        return min(BATCH_ITEMS, size * 2)
    if elapsed > BATCH_SECONDS:
        return max(1, size // 2)
    return size


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

    @property
    def over(self) -> bool:
        """Whether this was the stream's last batch: no iterator is left to hold."""
        return self.ended or self.error is not None


class LiveIterator(Generic[K]):
    """The iterator a worker holds for a generator task between its batches, and what it
    may still make: ``credit`` items before its consumer takes any more, in batches of
    ``size`` (which adapts, see ``next_batch_size``)."""

    __slots__ = ("clock", "closed", "closing", "credit", "iterator", "job", "run_time", "size")

    def __init__(
        self,
        job: K,
        iterator: Iterator[Any],
        credit: int,
        run_time: float = 0.0,
        clock: Callable[[], float] = perf_counter,
    ) -> None:
        self.job = job
        self.iterator = iterator
        self.credit = credit
        self.run_time = run_time  # seconds in the call and in the iterator so far
        self.clock = clock  # what batches are timed by
        self.size = 1  # items per batch: grows while the generator is fast
        self.closing = False  # cancelled: its next turn shuts it
        self.closed = False  # its iterator was closed: once is enough

    def limit(self) -> int:
        """How many items its next batch may hold: what its credit allows, up to its batch
        size."""
        return min(self.credit, self.size)

    def produce(self, limit: int, *, within: float | None = None) -> Batch:
        """Make up to limit items, keeping those made before the iterator raised.

        Without ``within`` the batch size adapts to how long this batch took. With it, the
        batch also ends once making it took ``within`` seconds, the clock read after each
        item: for a worker whose every batch is a round trip, which asks for as many items
        as the credit allows at once.
        """
        items: list[Any] = []
        ended = False
        error: BaseException | None = None
        clock = self.clock
        start = clock()
        try:
            if within is None:
                items.extend(islice(self.iterator, limit))  # keeps the items before a raise
                ended = len(items) < limit
            else:
                deadline = start + within
                for item in self.iterator:
                    items.append(item)
                    if len(items) >= limit or clock() > deadline:
                        break
                else:
                    ended = True
        except BaseException as exc:
            error = exc
        elapsed = clock() - start
        if within is None:
            self.size = next_batch_size(self.size, elapsed)
        self.run_time += elapsed
        return Batch(items, ended, error)

    def shut(self, job_id: int) -> BaseException:
        """Close the iterator (a generator's ``finally`` runs) and return what the job
        ends with: ``CancelledError``, or what the clean-up raised."""
        error = self._close()
        if error is None:
            return asyncio.CancelledError(f"the stream of job {job_id} was closed")
        return error

    def discard(self) -> None:
        """Close the iterator, ignoring what its clean-up raises (it failed already, or
        the worker is going)."""
        self._close()

    def _close(self) -> BaseException | None:
        """Close the iterator once, timed; what its clean-up raised, if anything."""
        start = self.clock()
        error = None
        try:
            close = None if self.closed else getattr(self.iterator, "close", None)
            self.closed = True
            if close is not None:
                close()
        except BaseException as exc:
            error = exc
        self.run_time += self.clock() - start
        return error


class Turns(Generic[K]):
    """A worker's live iterators, in turn order, and whose turn is next: a stream's or the
    worker's waiting jobs'. A batch of a stream with credit alternates with one waiting
    job, so a stream never holds the worker and jobs never starve the streams; a stream
    waiting for credit takes no turn."""

    __slots__ = ("_streams_turn", "live")

    def __init__(self) -> None:
        # By job; insertion order is turn order. Public so that a worker's loop tests
        # ``if turns.live`` (no call) on its way to every job.
        self.live: dict[K, LiveIterator[K]] = {}
        self._streams_turn = False

    def add(self, live: LiveIterator[K]) -> None:
        """A new stream: last in line."""
        self.live[live.job] = live

    def pop(self, job: K) -> LiveIterator[K] | None:
        """Take job's stream out of the turns, if it is open."""
        return self.live.pop(job, None)

    def drain(self) -> list[LiveIterator[K]]:
        """Take every open stream out (the worker is going)."""
        streams = list(self.live.values())
        self.live.clear()
        return streams

    def grant(self, job: K, n: int) -> bool:
        """The consumer of job's stream took n items: n more may be made. Whether the
        stream is open (the worker may have a turn to take now)."""
        live = self.live.get(job)
        if live is None:
            return False
        live.credit += n
        return True

    def cancel(self, job: K) -> bool:
        """Have job's stream shut at its next turn; whether it is open."""
        live = self.live.get(job)
        if live is None:
            return False
        live.closing = True
        return True

    def waiting(self) -> bool:
        """Whether some stream has a turn to take: it is to be shut, or has credit."""
        return any(s.closing or s.credit > 0 for s in self.live.values())

    def choose(self, jobs_waiting: bool, *, ending: bool = False) -> LiveIterator[K] | None:
        """The stream whose turn it is, or None: a waiting job's turn (or, with none, no
        turn at all: wait for credit or work).

        A stream to shut goes first (shutting is quick, and ends a job); then streams with
        credit and the waiting jobs take turns. ``ending`` (the worker is stopping and has
        no job waiting): only a stream to shut takes a turn; the rest are closed as the
        worker goes."""
        ready = None
        for live in self.live.values():
            if live.closing:
                return live
            if ready is None and live.credit > 0:
                ready = live
        if ending:
            return None
        if ready is None or (jobs_waiting and not self._streams_turn):
            self._streams_turn = True
            return None
        self._streams_turn = False
        return ready

    def end_turn(self, live: LiveIterator[K], batch: Batch) -> None:
        """live made batch, which its worker sends: its credit is spent, and it goes to
        the back of the line, or out if that was its last batch."""
        live.credit -= len(batch.items)
        # Not back in line if the worker let go of its streams during the turn (it died).
        if self.live.pop(live.job, None) is not None and not batch.over:
            self.live[live.job] = live
