"""The ``Worker`` contract (``corral.workers._base``), one suite for every in-loop kind:
``LocalWorker`` (jobs run in the event loop) and ``ThreadWorker`` (jobs run in a thread of
its own), each driven by the recording host of ``tests.hosts`` and through a ``TaskQueue``.

Each test runs once per kind. Where a kind must be driven its own way (a call that blocks
or ignores cancellation is a coroutine in the loop but a plain call in a thread, which can
be interrupted only in Python bytecode), the ``Kind`` says how; what is true of one kind
alone stays in ``test_local_worker.py`` or ``test_thread_worker.py``."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

import corral
from corral import JobState
from corral.workers._base import Worker
from corral.workers._local import LocalWorker
from corral.workers._thread import ThreadWorker
from tests import tasks, waits
from tests.hosts import BOUND, Host, send, started

# An event a call and the test share: an asyncio.Event for a call in the loop, a
# threading.Event for one in another thread.
Event = asyncio.Event | threading.Event


@dataclass(frozen=True)
class Kind:
    """A kind of worker, and what its contract tests must do differently for it."""

    name: str
    make: Callable[..., Worker]  # the worker class: make(initializer=..., initargs=...)
    event: Callable[[], Event]  # the events its calls can set and wait for
    # (running, release): sets running, then waits for release. A thread's call waits
    # blocked in C, where no interrupt lands; a loop's coroutine can only be cancelled.
    block: Callable[..., object]
    # (running, release): sets running, then waits for release; a cancel stops it at once.
    interruptible: Callable[..., object]
    # (running, release, caught): sets running, then waits for release, noting each
    # CancelledError it swallows in caught.
    stubborn: Callable[..., object]
    thread: Callable[[Worker], str]  # the name of the thread the worker's calls run in
    # Giving up on a running call cancels it once more: a task can be cancelled again,
    # while a thread's call gets one interrupt of each kind.
    give_up_cancels_again: bool
    # kill() closes open streams before it returns: the loop closes them itself, while a
    # busy thread closes them once it exits, and kill() does not wait for that.
    kill_closes_streams: bool


# -- calls for each kind ---------------------------------------------------------------


async def wait_until(running: asyncio.Event, release: asyncio.Event) -> str:
    """Sets running, then waits for release."""
    running.set()
    await release.wait()
    return "released"


async def stubborn_coroutine(
    running: asyncio.Event, release: asyncio.Event, caught: list[str]
) -> str:
    """Waits for release, swallowing every cancellation."""
    while not release.is_set():
        try:
            running.set()
            await release.wait()
        except asyncio.CancelledError:
            caught.append("cancelled")
    return "released"


def block(running: threading.Event, release: threading.Event) -> str:
    """Sets running, then waits (bounded) for release, blocked in C."""
    running.set()
    release.wait(BOUND)
    return "released"


def spin(running: threading.Event, release: threading.Event) -> str:
    """Busy in Python bytecode (so an interrupt lands at once) until released (BOUND s at
    most: a lost interrupt must not leave a thread spinning into later tests)."""
    running.set()
    deadline = time.monotonic() + BOUND
    while not release.is_set() and time.monotonic() < deadline:
        pass
    return "released"


def stubborn_call(running: threading.Event, release: threading.Event, caught: list[str]) -> str:
    """Spins, swallowing every CancelledError, until released (BOUND s at most)."""
    deadline = time.monotonic() + BOUND
    while not release.is_set() and time.monotonic() < deadline:
        try:
            running.set()
            while not release.is_set() and time.monotonic() < deadline:
                pass
        except asyncio.CancelledError:
            caught.append("cancelled")
    return "released"


LOCAL = Kind(
    name="local",
    make=LocalWorker,
    event=asyncio.Event,
    block=wait_until,
    interruptible=wait_until,
    stubborn=stubborn_coroutine,
    thread=lambda worker: threading.current_thread().name,  # the loop's, where tests run
    give_up_cancels_again=True,
    kill_closes_streams=True,
)

THREAD = Kind(
    name="thread",
    make=ThreadWorker,
    event=threading.Event,
    block=block,
    interruptible=spin,
    stubborn=stubborn_call,
    thread=lambda worker: f"corral-{worker.name}",
    give_up_cancels_again=False,
    kill_closes_streams=False,
)


@pytest.fixture(params=[LOCAL, THREAD], ids=lambda kind: kind.name)
def kind(request: pytest.FixtureRequest) -> Kind:
    """The kind of worker a contract test runs on."""
    result: Kind = request.param
    return result


# -- helpers ---------------------------------------------------------------------------


async def wait_for(event: Event) -> None:
    """Wait (bounded) for an asyncio.Event, or for a threading.Event without blocking the
    loop."""
    if isinstance(event, asyncio.Event):
        await waits.bounded(event.wait(), BOUND)
    else:
        assert await asyncio.to_thread(event.wait, BOUND)


async def settle(kind: Kind, worker: Worker) -> None:
    """Wait (bounded) for the worker's own thread, where it has one, to end; then let the
    loop run what that thread posted, or what an abandoned task does, before checking."""
    for thread in threading.enumerate():
        if thread.name == kind.thread(worker) and thread is not threading.current_thread():
            await asyncio.to_thread(thread.join, BOUND)
            assert not thread.is_alive()
    for _ in range(5):
        await asyncio.sleep(0)


def new_threads(before: set[threading.Thread]) -> list[str]:
    """The names of the threads alive now that were not in before."""
    return sorted(thread.name for thread in threading.enumerate() if thread not in before)


# -- tasks for every kind ----------------------------------------------------------------


def whoami() -> str:
    return threading.current_thread().name


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


async def async_fail(message: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


async def handle_cancel(running: Event) -> str:
    """Sets running, then sleeps (bounded); returns "handled" when cancelled."""
    running.set()
    try:
        await asyncio.sleep(BOUND)
    except asyncio.CancelledError:
        return "handled"
    return "slept"


def counting(produced: list[int], closed: threading.Event, where: list[str]) -> Iterator[int]:
    """Yield 0, 1, 2, ... forever, counting in produced[0]; note the thread it ends in."""
    try:
        for i in itertools.count():
            produced[0] += 1
            yield i
    finally:
        where.append(threading.current_thread().name)
        closed.set()


async def async_report_each(n: int) -> str:
    for i in range(n):
        corral.report(i)
        await asyncio.sleep(0)
    return "finished"


# -- tests -------------------------------------------------------------------------------


async def test_values_and_exceptions_come_back_unwrapped(kind: Kind) -> None:
    """Values and exceptions of plain calls and of coroutines come back through job_done,
    unwrapped, with their own tracebacks; job_started comes first, with the job RUNNING;
    every callback is made in the loop's thread; the calls run in the kind's thread, and
    once stop() returns no thread of the worker is left."""
    before = set(threading.enumerate())
    host = Host()
    worker = await started(kind.make(), host)
    try:
        assert worker.alive
        assert worker.pid is None
        jobs = [
            host.job(tasks.add, 2, 3),
            host.job(tasks.fail, "plain"),
            host.job(async_add, 4, 5),
            host.job(async_fail, "async"),
            host.job(whoami),
        ]
        for job in jobs:
            worker.send(job)
            assert job.state in (JobState.SENT, JobState.RUNNING)
        assert await host.outcome(jobs[0]) == (5, None)
        assert await host.outcome(jobs[2]) == (9, None)
        for job, message in ((jobs[1], "plain"), (jobs[3], "async")):
            value, error = await host.outcome(job)
            assert value is None
            assert isinstance(error, ValueError)
            assert str(error) == message
            assert error.__cause__ is None
            assert error.__traceback__ is not None
            if job is jobs[1]:
                assert error.__traceback__.tb_next is not None  # tasks.fail()'s frame
        assert await host.outcome(jobs[4]) == (kind.thread(worker), None)
        assert host.events == [(event, i) for i in range(1, 6) for event in ("started", "done")]
        assert host.states_at_start == {job.id: JobState.RUNNING for job in jobs}
        assert (worker.tasks_sent, worker.tasks_done) == (5, 5)
    finally:
        await worker.stop()
    assert not worker.alive
    assert new_threads(before) == []


async def test_send_never_blocks_and_jobs_run_one_at_a_time_in_order(kind: Kind) -> None:
    """send() returns while the worker is busy; the jobs sent run afterwards, one after
    another, in order, never two at once: coroutines and plain calls alike."""
    host = Host()
    worker = await started(kind.make(), host)
    running, release = kind.event(), kind.event()
    log: list[tuple[str, int]] = []

    async def record_coroutine(i: int) -> int:
        log.append(("in", i))
        await asyncio.sleep(0.001)
        log.append(("out", i))
        return i

    def record_call(i: int) -> int:
        log.append(("in", i))
        time.sleep(0.002)
        log.append(("out", i))
        return i

    try:
        send(worker, host.job(kind.block, running, release))
        await wait_for(running)
        jobs = [host.job(record_coroutine, i) for i in range(5)]
        jobs += [host.job(record_call, i) for i in range(5, 10)]
        for job in jobs:
            worker.send(job)
        assert not log  # queued behind the busy call
        release.set()
        assert [(await host.outcome(job))[0] for job in jobs] == list(range(10))
        assert log == [(step, i) for i in range(10) for step in ("in", "out")]
    finally:
        release.set()
        await worker.stop()


async def test_initializer_plain_or_async_runs_first_where_the_calls_run(kind: Kind) -> None:
    """The initializer runs at start, before any job, in the thread the calls run in; one
    that returns an awaitable is awaited."""
    seen: list[str] = []

    def init(tag: str) -> None:
        seen.append(tag + whoami())

    async def async_init(tag: str) -> None:
        await asyncio.sleep(0)
        seen.append(tag + whoami())

    host = Host()
    for initializer in (init, async_init):
        worker = await started(kind.make(initializer=initializer, initargs=("ready in ",)), host)
        try:
            assert seen == [f"ready in {kind.thread(worker)}"]
            assert await host.outcome(send(worker, host.job(tasks.add, 1, 1))) == (2, None)
        finally:
            await worker.stop()
        seen.clear()


async def test_a_raising_initializer_fails_start_and_leaves_nothing(kind: Kind) -> None:
    """start() raises WorkerStartupError naming the initializer's error, which is its
    cause; no thread of the worker is left when it raises, no loss is reported, and the
    worker is dead and cannot be started again."""
    before = set(threading.enumerate())
    host = Host()
    worker = kind.make(initializer=tasks.fail, initargs=("no config",))
    with pytest.raises(corral.WorkerStartupError, match="ValueError: no config") as caught:
        async with asyncio.timeout(BOUND):
            await worker.start(host)
    assert isinstance(caught.value.__cause__, ValueError)
    assert not worker.alive
    assert new_threads(before) == []
    with pytest.raises(RuntimeError, match="cannot start"):
        await worker.start(host)
    await worker.stop()  # nothing to do
    assert not host.lost.done()


async def test_bad_arguments_and_lifecycle_errors(kind: Kind) -> None:
    """A non-callable initializer is refused at the call; a worker starts once; stop and
    kill on a worker never started return; stop is idempotent; a stopped worker refuses
    jobs."""
    for initializer in ("setup", 42):
        with pytest.raises(TypeError, match="initializer must be callable"):
            kind.make(initializer=initializer)
    await kind.make().stop()
    await kind.make().kill()
    host = Host()
    worker = await started(kind.make(), host)
    with pytest.raises(RuntimeError, match="cannot start"):
        await worker.start(host)
    await worker.stop()
    await worker.stop()
    with pytest.raises(RuntimeError, match="cannot send"):
        worker.send(host.job(tasks.add, 1, 2))


async def test_soft_limit_cancels_a_coroutine(kind: Kind) -> None:
    """At its soft limit a coroutine's task is cancelled: the caller gets
    SoftTimeLimitExceeded with the limit, caused by the cancellation, unless the coroutine
    handles the CancelledError and returns; the worker serves on."""
    host = Host()
    worker = await started(kind.make(), host)
    try:
        slow = send(worker, host.job(asyncio.sleep, BOUND, soft=0.05))
        _, error = await host.outcome(slow)
        assert type(error) is corral.SoftTimeLimitExceeded
        assert error.limit == 0.05
        assert isinstance(error.__cause__, asyncio.CancelledError)
        # Not before the limit (uvloop's timers count whole ms: up to 1 ms early).
        assert 0.05 - 0.002 <= (host.run_times[slow.id] or 0) < BOUND
        handled = send(worker, host.job(handle_cancel, kind.event(), soft=0.05))
        assert await host.outcome(handled) == ("handled", None)
        assert worker.alive
    finally:
        await worker.stop()


async def test_cancel_a_job_not_started_or_already_cancelled(kind: Kind) -> None:
    """A job cancelled while queued, one already CANCELLED when sent, and one marked
    CANCELLED while queued never run, and have no run_time; each is reported through
    job_done with CancelledError, freeing its slot while the busy job still runs."""
    host = Host()
    worker = await started(kind.make(), host)
    running, release = kind.event(), kind.event()
    ran: list[str] = []
    try:
        busy = host.job(kind.block, running, release)
        queued, marked, early = (host.job(ran.append, n) for n in ("queued", "marked", "early"))
        last = host.job(ran.append, "last")
        early.state = JobState.CANCELLED
        for job in (busy, queued, marked, early, last):
            worker.send(job)
        await wait_for(running)
        worker.cancel(queued)
        assert (await host.outcome(queued))[0] is None
        assert not host.outcomes[busy.id].done()
        marked.state = JobState.CANCELLED
        release.set()
        for job in (queued, marked, early):
            value, error = await host.outcome(job)
            assert (value, type(error)) == (None, asyncio.CancelledError)
            assert ("started", job.id) not in host.events
            assert job.run_time is None
            assert host.run_times[job.id] is None
        assert await host.outcome(last) == (None, None)
        assert ran == ["last"]
    finally:
        release.set()
        await worker.stop()


async def test_cancel_interrupts_a_running_call_and_the_worker_serves_on(kind: Kind) -> None:
    """Cancelling a running call, or a running coroutine, interrupts it with
    CancelledError; job_done reports that, and the worker serves the next job (no loss)."""
    host = Host()
    worker = await started(kind.make(), host)
    running, release = kind.event(), kind.event()
    try:
        job = send(worker, host.job(kind.interruptible, running, release))
        await wait_for(running)
        worker.cancel(job, grace=BOUND)
        _, error = await host.outcome(job)
        assert isinstance(error, asyncio.CancelledError)
        coroutine = send(worker, host.job(asyncio.sleep, BOUND))
        await waits.until(lambda: ("started", coroutine.id) in host.events, BOUND)
        worker.cancel(coroutine, grace=BOUND)
        _, error = await host.outcome(coroutine)
        assert isinstance(error, asyncio.CancelledError)
        assert await host.outcome(send(worker, host.job(tasks.add, 1, 2))) == (3, None)
        assert worker.alive
        assert not host.lost.done()
    finally:
        release.set()
        await worker.stop()


async def test_a_call_ignoring_cancel_is_abandoned_after_grace(kind: Kind) -> None:
    """A call that swallows cancellation is still running after the grace period: the
    worker gives up, is dead, and reports the call as started and the queued job as
    unstarted; the abandoned call's outcome is never reported."""
    host = Host()
    worker = await started(kind.make(), host)
    running, release = kind.event(), kind.event()
    caught: list[str] = []
    try:
        job = send(worker, host.job(kind.stubborn, running, release, caught))
        queued = send(worker, host.job(tasks.add, 1, 1))
        await wait_for(running)
        began = time.monotonic()
        worker.cancel(job, grace=0.2)
        error, unstarted, lost = await host.loss()
        # Not before the grace period (uvloop's timers count whole ms: up to 1 ms early).
        assert time.monotonic() - began >= 0.2 - 0.002
        assert isinstance(error, corral.WorkerLostError)
        assert "still running 0.2 s after it was cancelled" in str(error)
        assert (unstarted, lost) == ([queued], [job])
        assert not worker.alive
        assert caught[:1] == ["cancelled"]
    finally:
        release.set()
    await settle(kind, worker)
    # Cancelled once by cancel(); a task once more as the worker gives up on it.
    assert caught == ["cancelled"] * (2 if kind.give_up_cancels_again else 1)
    assert not host.outcomes[job.id].done()
    assert not host.outcomes[queued.id].done()
    await worker.stop()  # dead already: returns


@pytest.mark.parametrize("handles", [False, True], ids=["raising", "handling"])
async def test_grace_zero_gives_up_at_once(kind: Kind, handles: bool) -> None:
    """cancel(grace=0) on a running call gives the worker up without waiting, even for a
    call that would have stopped (by raising CancelledError, or by handling it and
    returning); the call is cancelled, its thread (if it has one) ends without being
    released, and its outcome is ignored."""
    host = Host()
    worker = await started(kind.make(), host)
    running, release = kind.event(), kind.event()
    try:
        if handles:
            job = send(worker, host.job(handle_cancel, running))
        else:
            job = send(worker, host.job(kind.interruptible, running, release))
        await wait_for(running)
        worker.cancel(job, grace=0)
        _, unstarted, lost = await host.loss()
        assert (unstarted, lost) == ([], [job])
        assert not worker.alive
        await settle(kind, worker)  # interrupted, without being released
    finally:
        release.set()
    assert not host.outcomes[job.id].done()


async def test_stop_finishes_the_jobs_already_sent(kind: Kind) -> None:
    """stop() returns once every job already sent has run, coroutines and plain calls, and
    no thread of the worker is left; no loss is reported."""
    before = set(threading.enumerate())
    host = Host()
    worker = await started(kind.make(), host)
    jobs = [host.job(asyncio.sleep, 0.01, i) for i in range(5)]
    jobs += [host.job(time.sleep, 0.01) for _ in range(5)]
    for job in jobs:
        worker.send(job)
    async with asyncio.timeout(BOUND):
        await worker.stop()
    outcomes = [host.outcomes[job.id].result() for job in jobs]
    assert outcomes == [(i, None) for i in range(5)] + [(None, None)] * 5
    assert new_threads(before) == []
    assert not worker.alive
    assert not host.lost.done()


async def test_kill_reports_what_it_held(kind: Kind) -> None:
    """kill() reports the running job as started and the queued ones as unstarted, in
    order, and returns without waiting for the running call; the call's later outcome is
    ignored."""
    host = Host()
    worker = await started(kind.make(), host)
    running, release = kind.event(), kind.event()
    try:
        busy = host.job(kind.block, running, release)
        queued = [host.job(tasks.add, i, i) for i in range(3)]
        for job in (busy, *queued):
            worker.send(job)
        await wait_for(running)
        async with asyncio.timeout(BOUND):
            await worker.kill()
        error, unstarted, lost = await host.loss()
        assert isinstance(error, corral.WorkerLostError)
        assert "killed" in str(error)
        assert (unstarted, lost) == (queued, [busy])
        assert not worker.alive
    finally:
        release.set()
    await settle(kind, worker)
    assert not any(host.outcomes[job.id].done() for job in (busy, *queued))


async def test_kill_when_idle_leaves_nothing_and_reports_nothing(kind: Kind) -> None:
    """An idle worker killed on purpose is dead, reports no loss, and no thread of it is
    left when kill() returns."""
    before = set(threading.enumerate())
    host = Host()
    worker = await started(kind.make(), host)
    async with asyncio.timeout(BOUND):
        await worker.kill()
    assert not worker.alive
    assert new_threads(before) == []
    assert not host.lost.done()


async def test_run_time_is_the_time_in_the_call(kind: Kind) -> None:
    """run_time, set before job_done, is the time the call took (0.2 s: within 10%), for
    a coroutine and for a plain call."""
    host = Host()
    worker = await started(kind.make(), host)
    try:
        for fn in (asyncio.sleep, time.sleep):
            job = send(worker, host.job(fn, 0.2))
            await host.outcome(job)
            run_time = host.run_times[job.id]
            assert run_time is not None
            assert 0.2 <= run_time < 0.22
    finally:
        await worker.stop()


# -- streams and reports -----------------------------------------------------------------


async def test_a_stream_runs_ahead_only_as_far_as_its_credit(kind: Kind) -> None:
    """A stream makes exactly its credit of items, then waits for more while the worker
    serves other jobs; credit(n) lets it make n more; cancel closes the generator in the
    thread the calls run in and ends the job with CancelledError, after its items."""
    host = Host()
    worker = await started(kind.make(), host)
    produced, closed, where = [0], threading.Event(), list[str]()
    job = send(worker, host.job(counting, produced, closed, where, window=10))
    try:
        assert await host.until_items(job, 10) == list(range(10))
        assert await host.outcome(send(worker, host.job(async_add, 1, 2))) == (3, None)
        assert produced == [10]  # it waited for credit while the call ran
        worker.credit(job, 5)
        assert await host.until_items(job, 15) == list(range(15))
        assert await host.outcome(send(worker, host.job(tasks.add, 2, 2))) == (4, None)
        assert produced == [15]
        worker.cancel(job)
        _, error = await host.outcome(job)
        assert isinstance(error, asyncio.CancelledError)
        assert closed.is_set() and where == [kind.thread(worker)]
        assert host.run_times[job.id] is not None
        assert host.items[job.id] == list(range(15))
        assert worker.alive and not host.lost.done()
    finally:
        await worker.stop()


async def test_reports_and_items_come_in_order_before_done(kind: Kind) -> None:
    """corral.report from a plain call, a coroutine and a generator reaches job_report in
    order, in the loop's thread, before job_done (a generator's before the items made
    after it); the reporter is set only while the job runs."""
    host = Host()
    worker = await started(kind.make(), host)
    try:
        for fn in (tasks.report_numbers, async_report_each):
            job = send(worker, host.job(fn, 3))
            assert await host.outcome(job) == ("finished", None)
            assert host.reports[job.id] == [0, 1, 2]
            mine = [event for event in host.events if event[1] == job.id]
            assert mine == [("started", job.id), *[("report", job.id)] * 3, ("done", job.id)]
        job = send(worker, host.job(tasks.report_then_yield, 3, window=100))
        assert await host.outcome(job) == (None, None)
        assert host.reports[job.id] == ["before 0", "before 1", "before 2"]
        assert host.items[job.id] == [0, 1, 2]
        mine = [event for event in host.events if event[1] == job.id]
        assert mine[-2:] == [("items", job.id), ("done", job.id)]
    finally:
        await worker.stop()
    with pytest.raises(RuntimeError, match="outside a task"):
        corral.report("after")


@pytest.mark.parametrize("end", ["stop", "kill"])
async def test_stop_and_kill_close_open_streams_and_report_them_lost(kind: Kind, end: str) -> None:
    """A worker stopped or killed with a stream open closes its generator in the thread
    its calls run in (finally runs: before stop returns, and before kill returns where
    the loop closes it), as a process child does at EOF, and reports the stream as
    started in worker_lost."""
    host = Host()
    worker = await started(kind.make(), host)
    produced, closed, where = [0], threading.Event(), list[str]()
    job = send(worker, host.job(counting, produced, closed, where, window=2))
    await host.until_items(job, 2)
    async with asyncio.timeout(BOUND):
        await (worker.stop() if end == "stop" else worker.kill())
    if end == "stop" or kind.kill_closes_streams:
        assert closed.is_set()
    error, unstarted, lost = await host.loss()
    assert isinstance(error, corral.WorkerLostError)
    assert (unstarted, lost) == ([], [job])
    await wait_for(closed)
    assert where == [kind.thread(worker)]
    await settle(kind, worker)
    assert not worker.alive


# -- through a TaskQueue ---------------------------------------------------------------


async def test_task_queue_runs_calls_as_the_worker_does(kind: Kind) -> None:
    """Through a TaskQueue: values and exceptions of plain calls and coroutines, soft
    limits, and cancellation of a running call, as from the worker itself; the worker
    serves on after the cancel."""
    running, release = kind.event(), kind.event()
    try:
        async with corral.TaskQueue() as queue:
            async with asyncio.timeout(BOUND):
                await queue.attach(kind.make())
                assert await queue.run(tasks.add, 2, 40) == 42
                with pytest.raises(ValueError, match="boom"):
                    await queue.run(tasks.fail, "boom")
                assert await queue.run(async_add, 1, 1) == 2
                with pytest.raises(ValueError, match="bang"):
                    await queue.run(async_fail, "bang")
                with pytest.raises(corral.SoftTimeLimitExceeded):
                    await queue.run(asyncio.sleep, BOUND, soft_time_limit=0.05)
                job = queue.submit(kind.interruptible, running, release)
                await wait_for(running)
                job.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await job
                assert await queue.run(tasks.add, 1, 1) == 2
    finally:
        release.set()
