"""``Tracker``: it counts awaitables until they are done and wakes ``all``, ``any`` and
``until_fewer`` as that count falls, without ever reading an outcome (the owner still gets
it, and asyncio still reports one nobody retrieved), and without cancelling what it tracks."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import pytest

from corral import Job
from corral._job import new_job
from corral._tracker import Tracker
from tests import tasks

WAIT = 10  # seconds: a bound for waits that should end at once, never a pace


async def passes(n: int = 10) -> None:
    """Let the loop run n passes: time for callbacks already scheduled (a done future's
    callbacks, a woken waiter's step) to run. A count of passes, not a timed sleep."""
    for _ in range(n):
        await asyncio.sleep(0)


def new_future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


async def block(event: asyncio.Event, value: Any = None) -> Any:
    await event.wait()
    return value


async def fail(error: BaseException) -> None:
    raise error


class Owner:
    """A ``JobOwner`` that ignores cancellation."""

    def cancel_job(self, job: Job[Any]) -> None:
        pass


class Awaitable:
    """An awaitable that is neither a coroutine nor a future."""

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future

    def __await__(self) -> Generator[Any, None, Any]:
        return self.future.__await__()


async def test_put_a_coroutine_runs_it_as_a_task() -> None:
    """A coroutine put in becomes a running task, counted until done, whose value the caller
    awaits."""
    tracker = Tracker()
    event = asyncio.Event()
    task = tracker.put(block(event, "value"))
    assert isinstance(task, asyncio.Task)
    assert len(tracker) == 1
    event.set()
    async with asyncio.timeout(WAIT):
        assert await task == "value"
        await tracker.all()
    assert len(tracker) == 0


async def test_put_a_future_or_task_returns_it() -> None:
    """A future or a task is tracked as itself, and putting it twice counts it once (and
    adds no second done-callback, which would find it gone and fail in the loop)."""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    tracker = Tracker()
    future = new_future()
    task = asyncio.ensure_future(block(asyncio.Event()))
    assert tracker.put(future) is future
    assert tracker.put(task) is task
    assert tracker.put(future) is future
    assert len(tracker) == 2
    future.set_result(1)
    task.cancel()
    async with asyncio.timeout(WAIT):
        await tracker.all()
    await passes()
    assert len(tracker) == 0
    assert future.result() == 1
    assert errors == []


async def test_put_a_job_or_other_awaitable() -> None:
    """A ``Job``, or any object with ``__await__``, is wrapped in a future that gives its
    value."""
    tracker = Tracker()
    job = new_job(Owner(), 1, tasks.add, (1, 2), asyncio.get_running_loop())
    other = Awaitable(new_future())
    tracked_job = tracker.put(job)
    tracked_other = tracker.put(other)
    assert len(tracker) == 2
    job.future.set_result(3)
    other.future.set_result("other")
    async with asyncio.timeout(WAIT):
        await tracker.all()
    assert tracked_job.result() == 3
    assert tracked_other.result() == "other"


async def test_put_a_done_future_counts_nothing() -> None:
    """A future already done is returned but not counted: nothing is left to wait for."""
    tracker = Tracker()
    future = new_future()
    future.set_result(1)
    assert tracker.put(future) is future
    assert len(tracker) == 0


@pytest.mark.parametrize("bad", [5, None, "text", tasks.add], ids=repr)
async def test_put_what_is_not_awaitable(bad: Any) -> None:
    """Putting what is not awaitable raises ``TypeError`` at the call, naming it."""
    tracker = Tracker()
    with pytest.raises(TypeError, match=r"Tracker\.put\(\) takes a coroutine") as info:
        tracker.put(bad)
    assert repr(bad) in str(info.value)
    assert len(tracker) == 0


async def test_put_a_coroutine_function_says_to_call_it() -> None:
    """An async function passed uncalled is refused with a hint to call it."""
    with pytest.raises(TypeError, match=r"call it"):
        Tracker().put(block)


async def test_put_a_future_of_another_loop() -> None:
    """A future of another event loop is refused: its callbacks would run there."""
    other = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="another event loop"):
            Tracker().put(other.create_future())
    finally:
        other.close()


def test_a_tracker_belongs_to_one_loop() -> None:
    """A tracker used on one loop refuses another; none can be used outside a loop."""
    tracker = Tracker()
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="no running event loop"):
            tracker.put(loop.create_future())
    finally:
        loop.close()

    async def use() -> None:
        future = tracker.put(block(asyncio.Event(), None))
        future.cancel()
        await tracker.all()

    with asyncio.Runner() as runner:
        runner.run(use())

    async def use_again() -> None:
        with pytest.raises(RuntimeError, match="another event loop"):
            tracker.put(new_future())

    with asyncio.Runner() as runner:
        runner.run(use_again())


async def test_all_with_nothing_pending_returns_at_once() -> None:
    """``all``, ``any`` and ``until_fewer`` on an empty tracker return without suspending."""
    tracker = Tracker()
    for wait in (tracker.all, tracker.any, lambda: tracker.until_fewer(1)):
        with pytest.raises(StopIteration):
            wait().send(None)


async def test_all_waits_for_every_one() -> None:
    """``all`` returns only once the last tracked awaitable is done, and returns None."""
    tracker = Tracker()
    futures = [tracker.put(new_future()) for _ in range(3)]
    waiter = asyncio.ensure_future(tracker.all())
    for future in futures[:-1]:
        future.set_result(None)
        await passes()
        assert not waiter.done()
    assert len(tracker) == 1
    futures[-1].set_result(None)
    async with asyncio.timeout(WAIT):
        assert await waiter is None
    assert len(tracker) == 0


async def test_all_waits_for_those_put_while_it_waits() -> None:
    """An awaitable put while ``all`` waits is waited for too."""
    tracker = Tracker()
    first = tracker.put(new_future())
    waiter = asyncio.ensure_future(tracker.all())
    await passes()
    second = tracker.put(new_future())
    first.set_result(None)
    await passes()
    assert not waiter.done()
    second.set_result(None)
    async with asyncio.timeout(WAIT):
        await waiter


async def test_failed_and_cancelled_count_as_done() -> None:
    """An awaitable that raised or was cancelled counts as done."""
    tracker = Tracker()
    failing = tracker.put(fail(ValueError("from a task")))
    errored = tracker.put(new_future())
    cancelled = tracker.put(new_future())
    errored.set_exception(KeyError("from a future"))
    cancelled.cancel()
    async with asyncio.timeout(WAIT):
        await tracker.all()
    assert len(tracker) == 0
    with pytest.raises(ValueError, match="from a task"):
        await failing
    with pytest.raises(KeyError, match="from a future"):
        await errored
    assert cancelled.cancelled()


async def test_exceptions_are_left_for_the_owner() -> None:
    """The tracker reads no outcome: after ``all``, the owner awaits the very exception."""
    tracker = Tracker()
    error = ValueError("for the owner")
    future = tracker.put(new_future())
    task = tracker.put(fail(error))
    future.set_exception(error)
    async with asyncio.timeout(WAIT):
        await tracker.all()
    for tracked in (future, task):
        with pytest.raises(ValueError) as info:
            await tracked
        assert info.value is error


@pytest.mark.parametrize("wait", ["all", "any", "until_fewer"])
async def test_unretrieved_exceptions_are_still_reported(wait: str) -> None:
    """An exception nobody retrieved is still reported by asyncio when its future is
    collected: the tracker's waiting did not mark it retrieved."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    tracker = Tracker()
    error = ValueError("forgotten")
    waits: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
        "all": tracker.all,
        "any": tracker.any,
        "until_fewer": lambda: tracker.until_fewer(1),
    }
    future = tracker.put(new_future())
    task = tracker.put(fail(error))
    future.set_exception(error)
    async with asyncio.timeout(WAIT):
        await waits[wait]()
        await tracker.all()
    del future, task
    gc.collect()
    assert [context["exception"] for context in reported] == [error, error]
    assert all("never retrieved" in context["message"] for context in reported)


async def test_any_waits_for_one_pending_when_called() -> None:
    """``any`` wakes when one of those pending at the call is done; one put later does not
    wake it."""
    tracker = Tracker()
    first = tracker.put(new_future())
    second = tracker.put(new_future())
    waiter = asyncio.ensure_future(tracker.any())
    await passes()
    later = tracker.put(new_future())
    later.set_result(None)
    await passes()
    assert not waiter.done()
    second.set_result(None)
    async with asyncio.timeout(WAIT):
        await waiter
    assert len(tracker) == 1
    assert not first.done()
    first.set_result(None)


async def test_until_fewer_waits_for_the_count_to_fall_below_n() -> None:
    """``until_fewer(n)`` wakes once fewer than n are pending, not before; it returns at once
    when there already are."""
    tracker = Tracker()
    futures = [tracker.put(new_future()) for _ in range(4)]
    async with asyncio.timeout(WAIT):
        await tracker.until_fewer(5)
    waiter = asyncio.ensure_future(tracker.until_fewer(2))
    for future in futures[:2]:
        future.set_result(None)
        await passes()
        assert not waiter.done()
    assert len(tracker) == 2
    futures[2].set_result(None)
    async with asyncio.timeout(WAIT):
        await waiter
    assert len(tracker) == 1
    futures[3].set_result(None)


async def test_waiters_of_different_kinds_wake_independently() -> None:
    """Several waiters at once each wake at their own condition."""
    tracker = Tracker()
    futures = [tracker.put(new_future()) for _ in range(3)]
    waiters = {
        "any": asyncio.ensure_future(tracker.any()),
        "fewer_than_2": asyncio.ensure_future(tracker.until_fewer(2)),
        "all": asyncio.ensure_future(tracker.all()),
    }
    woken: list[str] = []
    for future in futures:
        future.set_result(None)
        await passes()
        woken.append(",".join(name for name, waiter in waiters.items() if waiter.done()))
    assert woken == ["any", "any,fewer_than_2", "any,fewer_than_2,all"]


@pytest.mark.parametrize("n", [0, -1, 1.5, "2", None, True])
async def test_until_fewer_needs_a_positive_int(n: Any) -> None:
    """``until_fewer`` refuses anything but a positive int, at the call, before any await."""
    with pytest.raises(ValueError, match=r"positive int, got n=") as info:
        Tracker().until_fewer(n)
    assert repr(n) in str(info.value)


@pytest.mark.parametrize("wait", ["all", "any", "until_fewer"])
async def test_cancelling_a_waiter_leaves_tracked_tasks_running(wait: str) -> None:
    """Cancelling the task that waits cancels only that task: what is tracked keeps running,
    and the tracker still works."""
    tracker = Tracker()
    event = asyncio.Event()
    tracked = tracker.put(block(event, "value"))
    waits: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
        "all": tracker.all,
        "any": tracker.any,
        "until_fewer": lambda: tracker.until_fewer(1),
    }
    waiter = asyncio.ensure_future(waits[wait]())
    await passes()
    assert not waiter.done()
    waiter.cancel()
    async with asyncio.timeout(WAIT):
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert not tracked.done()
    assert len(tracker) == 1
    event.set()
    async with asyncio.timeout(WAIT):
        await tracker.all()
        assert await tracked == "value"


def test_repr() -> None:
    """The repr shows how many are pending."""
    assert repr(Tracker()) == "<Tracker pending=0>"
