"""``Job``: its states, its awaitable outcome, and cancellation reaching the queue that owns
it. No worker is involved: a fake owner records what the job tells it."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest

from corral import Job, JobState, _job
from corral._dispatcher import Dispatcher
from corral._job import JobCoroutine, take_retry
from corral._stream import ItemStream
from tests import tasks


class Owner:
    """A ``JobOwner`` that records the jobs it is asked to cancel."""

    def __init__(self) -> None:
        self.cancelled: list[Job[Any]] = []

    def cancel_job(self, job: Job[Any]) -> None:
        self.cancelled.append(job)


class QueueOwner:
    """A ``JobOwner`` backed by a real dispatcher, as the task queue is: cancelling a
    pending job withdraws it."""

    def __init__(self) -> None:
        self.dispatcher: Dispatcher[str, Job[Any]] = Dispatcher()

    def cancel_job(self, job: Job[Any]) -> None:
        self.dispatcher.discard(job)


def new_job(owner: Any, job_id: int = 1, **options: Any) -> Job[Any]:
    return _job.new_job(owner, job_id, tasks.add, (1, 2), asyncio.get_running_loop(), **options)


async def test_new_job_is_pending_and_has_no_outcome() -> None:
    """A new job is PENDING, not done, and asking for its outcome is an error."""
    job = new_job(Owner(), priority=-2, series="gpu", retries=3, time_limit=5.0)
    assert job.state is JobState.PENDING
    assert not job.done() and not job.cancelled()
    with pytest.raises(asyncio.InvalidStateError):
        job.result()
    with pytest.raises(asyncio.InvalidStateError):
        job.exception()
    assert (job.priority, job.series, job.retries, job.time_limit) == (-2, "gpu", 3, 5.0)
    assert job.soft_time_limit is None
    assert job.deliveries == 0
    assert repr(job) == "<Job 1 add pending>"


async def test_job_with_a_value() -> None:
    """When its future gets a value, the job is done: awaiting it, ``result()`` and
    ``exception()`` agree, and done callbacks receive the job itself."""
    job = new_job(Owner())
    seen: list[Job[Any]] = []
    job.add_done_callback(seen.append)
    job.future.set_result(3)
    assert await job == 3
    await asyncio.sleep(0)  # done callbacks run on the next loop pass
    assert job.done() and not job.cancelled()
    assert job.result() == 3
    assert job.exception() is None
    assert seen == [job]


async def test_job_with_an_exception() -> None:
    """When its future gets an exception, awaiting the job raises that very exception."""
    job = new_job(Owner())
    error = ValueError("boom")
    job.future.set_exception(error)
    with pytest.raises(ValueError, match="boom") as info:
        await job
    assert info.value is error
    assert job.exception() is error
    with pytest.raises(ValueError):
        job.result()


async def test_cancel_of_a_pending_job_tells_the_owner_once() -> None:
    """``cancel()`` of a pending job returns True, marks it CANCELLED, and calls the owner's
    ``cancel_job`` exactly once, even when cancelled again; awaiting it raises
    ``CancelledError``."""
    owner = Owner()
    job = new_job(owner)
    assert job.cancel() is True
    await asyncio.sleep(0)
    assert job.state is JobState.CANCELLED
    assert owner.cancelled == [job]
    assert job.cancel() is False
    job.future.cancel()
    await asyncio.sleep(0)
    assert owner.cancelled == [job]
    assert job.done() and job.cancelled()
    with pytest.raises(asyncio.CancelledError):
        await job
    with pytest.raises(asyncio.CancelledError):
        job.result()


async def test_cancel_withdraws_a_pending_job_before_returning() -> None:
    """Once ``cancel()`` returns, the job is CANCELLED and no longer pending in its queue,
    so a worker freed in the same loop iteration cannot be handed it ("a pending job never
    runs")."""
    owner = QueueOwner()
    job = new_job(owner)
    assert owner.dispatcher.push(job) == []
    job.cancel()
    assert owner.dispatcher.add_worker("w", 1, None) == [], "a cancelled job was dispatched"
    assert job.state is JobState.CANCELLED


async def test_cancel_of_a_running_job_tells_the_owner() -> None:
    """Cancelling a job already handed to a worker also reaches the owner (which stops it
    in its worker)."""
    owner = Owner()
    job = new_job(owner)
    job.state = JobState.RUNNING
    assert job.cancel() is True
    await asyncio.sleep(0)
    assert job.state is JobState.CANCELLED
    assert owner.cancelled == [job]


async def test_cancel_of_a_finished_job_is_refused() -> None:
    """A finished job cannot be cancelled: ``cancel()`` says False, the owner hears
    nothing, and the value stays."""
    owner = Owner()
    job = new_job(owner)
    job.state = JobState.DONE
    job.future.set_result(5)
    assert job.cancel() is False
    await asyncio.sleep(0)
    assert owner.cancelled == []
    assert job.state is JobState.DONE
    assert job.result() == 5


async def test_cancelling_the_future_withdraws_the_job_at_once() -> None:
    """Cancelling a job's future (as asyncio does for the future a cancelled task awaits)
    withdraws the job before cancel() returns: no loop pass in which a worker could still
    be handed it."""
    owner = Owner()
    job = new_job(owner)
    assert job.future.cancel()
    assert owner.cancelled == [job]
    assert job.state is JobState.CANCELLED


async def test_a_settled_job_is_not_withdrawn() -> None:
    """Once a job's future holds its value, cancelling does nothing and its owner is not
    told (the job is no longer anyone's to stop)."""
    owner = Owner()
    job = new_job(owner)
    job._finish()
    job.future.set_result(5)
    assert not job.cancel()
    assert not job.future.cancel()
    assert owner.cancelled == []
    assert job.result() == 5


async def test_cancelling_the_awaiting_task_cancels_the_job() -> None:
    """Cancelling the task that awaits a job cancels the job and reaches its owner, as
    cancelling a task cancels the future it awaits."""
    owner = Owner()
    job = new_job(owner)
    waiter = asyncio.ensure_future(_await(job))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.sleep(0)
    assert job.cancelled()
    assert job.state is JobState.CANCELLED
    assert owner.cancelled == [job]


async def _await(job: Job[Any]) -> Any:
    return await job


def test_job_states() -> None:
    """The states a job goes through, with stable values (they appear in reprs and stats),
    pickling by their public name."""
    assert [state.value for state in JobState] == [
        "pending",
        "sent",
        "running",
        "done",
        "cancelled",
    ]
    for state in JobState:
        assert pickle.loads(pickle.dumps(state)) is state


def test_a_job_is_not_made_by_hand() -> None:
    """``corral.Job`` is the handle a queue's ``submit`` returns: constructing one raises
    ``TypeError`` saying where jobs come from (its internals are no public constructor)."""
    with pytest.raises(TypeError, match=r"made by a queue's submit\(\)"):
        Job()


async def test_the_retry_rule_spends_retries_and_spares_broadcasts_and_running_streams() -> None:
    """``take_retry``, the one rule every kind of worker loss goes by: a job with retries
    left runs again and spends one; a broadcast (pinned to the lost worker) and a stream
    whose items have begun to arrive never do, retries or not."""
    job = new_job(Owner(), retries=2)
    assert take_retry(job) and take_retry(job)
    assert job.retries == 0
    assert not take_retry(job)
    broadcast = new_job(Owner(), retries=1)
    broadcast.worker = object()
    assert not take_retry(broadcast)
    assert broadcast.retries == 1
    stream = new_job(Owner(), retries=1)
    stream.stream = ItemStream(4)
    assert take_retry(stream)  # nothing arrived yet: it may start over elsewhere
    stream.retries = 1
    stream.stream.released = True
    assert not take_retry(stream)


async def test_asyncio_takes_a_job_as_a_future() -> None:
    """``asyncio.isfuture(job)``: gather, wait, shield and wait_for take jobs as they are
    (no task wrapped around each); callbacks get the job, can be removed, and cancelling a
    gather cancels its jobs, whose cancellation it reports as asyncio does."""
    owner = Owner()
    first, second = new_job(owner, 1), new_job(owner, 2)
    assert asyncio.isfuture(first)
    assert asyncio.ensure_future(first) is first
    seen: list[Any] = []
    first.add_done_callback(seen.append)
    first.add_done_callback(print)
    assert first.remove_done_callback(print) == 1
    gathered = asyncio.gather(first, second)
    first.future.set_result(3)
    second.future.set_result(4)
    assert await gathered == [3, 4]
    assert seen == [first]
    done, _ = await asyncio.wait([new_done(owner, 5)], timeout=60)
    assert [job.result() for job in done] == [5]
    assert await asyncio.wait_for(asyncio.shield(new_done(owner, 6)), 60) == 6
    third, fourth = new_job(owner, 3), new_job(owner, 4)
    outer = asyncio.gather(third, fourth)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert third.cancelled() and fourth.cancelled()
    assert owner.cancelled == [third, fourth]
    fifth = new_job(owner, 5)
    failing = asyncio.gather(fifth)
    fifth.cancel("why")
    with pytest.raises(asyncio.CancelledError, match="why"):
        await failing


def new_done(owner: Any, value: int, **options: Any) -> Job[Any]:
    job = new_job(owner, value, **options)
    job.future.set_result(value)
    return job


async def test_the_job_of_run_is_a_coroutine_to_asyncio_too() -> None:
    """``asyncio.create_task`` and a ``TaskGroup`` take run's job as a coroutine (where
    ``pool.run(...)`` went when it was one): the task ends with the job's value, and
    cancelling the task cancels the job. A job of ``submit`` is no coroutine (so
    ``asyncio.wait`` takes it)."""
    owner = Owner()
    assert not asyncio.iscoroutine(new_job(owner, 9))
    job = new_job(owner, 1, kind=JobCoroutine)
    assert asyncio.iscoroutine(job)
    task = asyncio.create_task(job)
    await asyncio.sleep(0)
    job.future.set_result(7)
    assert await task == 7
    async with asyncio.TaskGroup() as group:
        grouped = group.create_task(new_done(owner, 8, kind=JobCoroutine))
    assert grouped.result() == 8
    waiting = new_job(owner, 2, kind=JobCoroutine)
    cancelled = asyncio.create_task(waiting)
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert waiting.cancelled()
    assert owner.cancelled == [waiting]
