"""The producing side of ``iterate`` (``corral._streaming``), without processes or threads:
batch sizing, batches, closing, credit and the turns streams take with waiting jobs. Time
is a fake clock the test generators advance, so no test waits on the real one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from corral._streaming import (
    BATCH_ITEMS,
    BATCH_SECONDS,
    Batch,
    LiveIterator,
    Turns,
    next_batch_size,
    open_iterator,
)


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ticking(clock: Clock, step: float, n: int | None = None) -> Iterator[int]:
    """Yield 0, 1, 2, ... (n items, or forever), each taking step seconds of clock."""
    i = 0
    while n is None or i < n:
        clock.now += step
        yield i
        i += 1


def live(job: str = "a", credit: int = 100, clock: Clock | None = None) -> LiveIterator[str]:
    return LiveIterator(job, iter(range(1000)), credit, clock=clock or Clock())


def test_batch_size_doubles_while_fast_halves_when_slow_and_stays_bounded() -> None:
    """A batch made in under a quarter of BATCH_SECONDS doubles the next (up to
    BATCH_ITEMS), one over BATCH_SECONDS halves it (down to 1), one between keeps it."""
    assert next_batch_size(1, 0.0) == 2
    assert next_batch_size(BATCH_ITEMS, 0.0) == BATCH_ITEMS
    assert next_batch_size(8, BATCH_SECONDS * 2) == 4
    assert next_batch_size(1, BATCH_SECONDS * 2) == 1
    assert next_batch_size(8, BATCH_SECONDS / 2) == 8


def test_a_fast_generators_batches_grow_and_a_slow_ones_shrink() -> None:
    """The size a live iterator asks for follows how long its batches take."""
    clock = Clock()
    fast = LiveIterator("fast", ticking(clock, 0.0), credit=10_000, clock=clock)
    sizes = []
    for _ in range(4):
        sizes.append(fast.limit())
        fast.produce(fast.limit())
    assert sizes == [1, 2, 4, 8]
    slow = LiveIterator("slow", ticking(clock, BATCH_SECONDS), credit=10_000, clock=clock)
    slow.size = 8
    slow.produce(slow.limit())  # 8 items, 8 batch times
    assert slow.limit() == 4


def test_the_limit_is_the_credit_when_the_credit_is_smaller() -> None:
    """A stream never makes more items than its consumer's credit allows."""
    stream = live(credit=3)
    stream.size = 512
    assert stream.limit() == 3


def test_a_batch_keeps_the_items_made_before_the_iterator_raised() -> None:
    """Items made before a raise are sent, then the error ends the stream."""

    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("broken")

    stream = LiveIterator("a", failing(), 10, clock=Clock())
    items, ended, error = stream.produce(10)
    assert items == [1, 2]
    assert not ended
    assert isinstance(error, ValueError)
    assert Batch(items, ended, error).over


def test_a_batch_short_of_its_limit_ends_the_stream_a_full_one_does_not() -> None:
    """An iterator that stops within the batch has ended; one that filled the batch
    exactly is asked again (its next batch finds the end)."""
    stream = LiveIterator("a", iter(range(4)), 10, clock=Clock())
    assert stream.produce(4) == Batch([0, 1, 2, 3], False, None)
    assert stream.produce(4) == Batch([], True, None)
    assert Batch([], True, None).over
    assert not Batch([1], False, None).over


def test_a_batch_within_a_time_ends_at_that_time_or_at_its_limit() -> None:
    """With ``within`` a batch ends once making it took that long, and its size does not
    adapt (the puller names how many items it wants)."""
    clock = Clock()
    stream = LiveIterator("a", ticking(clock, 0.01), 10_000, clock=clock)
    items, ended, error = stream.produce(1000, within=0.035)
    assert items == [0, 1, 2, 3]  # the fourth item's clock passed the deadline
    assert not ended and error is None
    assert stream.produce(2, within=10.0).items == [4, 5]
    assert stream.size == 1
    assert stream.run_time == pytest.approx(0.06)
    short = LiveIterator("b", ticking(clock, 0.0, n=3), 10, clock=clock)
    assert short.produce(5, within=1.0) == Batch([0, 1, 2], True, None)


def test_run_time_counts_the_call_and_every_batch() -> None:
    """A stream's run time starts at its call's and adds each batch's."""
    clock = Clock()
    stream = LiveIterator("a", ticking(clock, 0.5), 10, run_time=2.0, clock=clock)
    stream.produce(2)
    assert stream.run_time == pytest.approx(3.0)


def not_iterable() -> int:
    return 1


def test_open_iterator_names_a_function_whose_value_is_no_iterable() -> None:
    """iterate() of a function returning a non-iterable says which function."""
    assert list(open_iterator(not_iterable, [1, 2])) == [1, 2]
    with pytest.raises(TypeError, match="iterate\\(\\) needs not_iterable to return an iterable"):
        open_iterator(not_iterable, 1)


def test_shut_runs_the_generators_finally_once_and_ends_the_job_cancelled() -> None:
    """Shutting a stream closes its generator (its finally runs, once) and the job ends
    with CancelledError naming it."""
    finals = []

    def gen() -> Iterator[int]:
        try:
            yield from range(10)
        finally:
            finals.append(True)

    stream = LiveIterator("a", gen(), 10, clock=Clock())
    stream.produce(1)
    error = stream.shut(7)
    assert isinstance(error, asyncio.CancelledError)
    assert "job 7" in str(error)
    stream.discard()
    assert finals == [True]


def test_shut_returns_what_the_clean_up_raised_and_discard_swallows_it() -> None:
    """A finally that raises is the job's outcome when shut; discarding ignores it."""

    def gen() -> Iterator[int]:
        try:
            yield 1
        finally:
            raise RuntimeError("clean-up failed")

    stream = LiveIterator("a", gen(), 10, clock=Clock())
    stream.produce(1)
    assert isinstance(stream.shut(1), RuntimeError)
    other = LiveIterator("b", gen(), 10, clock=Clock())
    other.produce(1)
    other.discard()  # no raise
    assert other.closed


def test_streams_and_waiting_jobs_take_turns() -> None:
    """With jobs waiting, a stream's batch and a job alternate (the job first); with none,
    the stream takes every turn."""
    turns: Turns[str] = Turns()
    stream = live("a")
    turns.add(stream)
    order = []
    for _ in range(3):
        chosen = turns.choose(True)
        order.append("job" if chosen is None else chosen.job)
        if chosen is not None:
            turns.end_turn(chosen, Batch([1], False, None))
    assert order == ["job", "a", "job"]
    assert turns.choose(False) is stream
    assert turns.choose(False) is stream


def test_streams_take_turns_among_themselves() -> None:
    """A stream that had its turn goes to the back of the line."""
    turns: Turns[str] = Turns()
    for job in "abc":
        turns.add(live(job))
    order = []
    for _ in range(4):
        chosen = turns.choose(False)
        assert chosen is not None
        order.append(chosen.job)
        turns.end_turn(chosen, Batch([0], False, None))
    assert order == ["a", "b", "c", "a"]


def test_a_stream_without_credit_waits_and_a_grant_wakes_it() -> None:
    """A stream whose consumer has not taken its items takes no turn; credit brings it
    back; a grant for a stream not open says so."""
    turns: Turns[str] = Turns()
    stream = live("a", credit=2)
    turns.add(stream)
    turns.end_turn(stream, Batch([0, 1], False, None))
    assert stream.credit == 0
    assert not turns.waiting()
    assert turns.choose(False) is None
    assert turns.grant("a", 5)
    assert turns.waiting()
    assert turns.choose(False) is stream
    assert not turns.grant("gone", 5)


def test_a_cancelled_stream_goes_first_even_while_stopping() -> None:
    """A stream to shut takes the next turn, credit or not, even when the worker is
    ending; when ending, no other stream takes a turn."""
    turns: Turns[str] = Turns()
    ready, cancelled = live("ready"), live("cancelled", credit=0)
    turns.add(ready)
    turns.add(cancelled)
    assert turns.choose(True, ending=True) is None
    assert turns.cancel("cancelled")
    assert not turns.cancel("gone")
    assert turns.waiting()
    assert turns.choose(True) is cancelled
    assert turns.choose(True, ending=True) is cancelled


def test_a_last_batch_takes_its_stream_out_of_the_turns() -> None:
    """A batch that ended or failed removes its stream; one of a worker that let go of
    its streams during the turn does not put it back."""
    turns: Turns[str] = Turns()
    a, b = live("a"), live("b")
    turns.add(a)
    turns.add(b)
    turns.end_turn(a, Batch([1], True, None))
    assert list(turns.live) == ["b"]
    turns.end_turn(b, Batch([], False, ValueError()))
    assert not turns.live
    c = live("c")
    turns.add(c)
    assert turns.drain() == [c]
    turns.end_turn(c, Batch([1], False, None))
    assert not turns.live
    assert turns.pop("c") is None
