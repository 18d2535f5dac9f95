"""``LocalWorker`` on its own, driven by a tiny host, and through a ``TaskQueue``: jobs run in
the event loop itself, one at a time, coroutines as tasks that cancellation and soft limits
interrupt, and a task that ignores cancellation is abandoned and reported lost."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import corral
from corral import JobState
from corral.workers._local import LocalWorker
from tests import tasks
from tests.hosts import Host, send

BOUND = 10.0


async def started(host: Host, **options: Any) -> LocalWorker:
    """A LocalWorker started for host."""
    worker = LocalWorker(**options)
    async with asyncio.timeout(BOUND):
        await worker.start(host)
    return worker


# -- tasks -------------------------------------------------------------------------------


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


async def async_fail(message: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


async def wait_until(running: asyncio.Event, release: asyncio.Event) -> str:
    running.set()
    await release.wait()
    return "released"


async def stubborn(running: asyncio.Event, release: asyncio.Event, caught: list[str]) -> str:
    """Waits for release, swallowing every cancellation."""
    while not release.is_set():
        try:
            running.set()
            await release.wait()
        except asyncio.CancelledError:
            caught.append("cancelled")
    return "released"


async def handle_cancel(running: asyncio.Event) -> str:
    running.set()
    try:
        await asyncio.sleep(BOUND)
    except asyncio.CancelledError:
        return "handled"
    return "slept"


def counting(produced: list[int], closed: list[str]) -> Iterator[int]:
    """Yield 0, 1, 2, ... forever, counting in produced[0]; note the thread it ends in."""
    try:
        for i in itertools.count():
            produced[0] += 1
            yield i
    finally:
        closed.append(threading.current_thread().name)


async def async_report_each(n: int) -> str:
    for i in range(n):
        corral.report(i)
        await asyncio.sleep(0)
    return "finished"


# -- tests -------------------------------------------------------------------------------


async def test_runs_plain_and_coroutine_calls_in_the_loop() -> None:
    """Values and exceptions of plain callables and of coroutines come back through
    job_done, unwrapped, with their own tracebacks; job_started comes first, with the job
    RUNNING; every call runs in the loop's thread."""
    host = Host()
    worker = await started(host)
    try:
        assert worker.alive
        assert worker.pid is None
        jobs = [
            host.job(tasks.add, 2, 3),
            host.job(tasks.fail, "plain"),
            host.job(async_add, 4, 5),
            host.job(async_fail, "async"),
            host.job(threading.get_ident),
        ]
        for job in jobs:
            worker.send(job)
            assert job.state is JobState.SENT
        assert await host.outcome(jobs[0]) == (5, None)
        assert await host.outcome(jobs[2]) == (9, None)
        for job, message in ((jobs[1], "plain"), (jobs[3], "async")):
            value, error = await host.outcome(job)
            assert value is None
            assert isinstance(error, ValueError)
            assert str(error) == message
            assert error.__cause__ is None
            assert error.__traceback__ is not None
        assert await host.outcome(jobs[4]) == (host.thread, None)
        assert host.events == [(kind, i) for i in range(1, 6) for kind in ("started", "done")]
        assert set(host.states_at_start.values()) == {JobState.RUNNING}
        assert (worker.tasks_sent, worker.tasks_done) == (5, 5)
    finally:
        await worker.stop()
    assert not worker.alive


async def test_send_never_runs_the_job_and_jobs_run_one_at_a_time_in_order() -> None:
    """send() only queues: nothing has run when it returns. Coroutines sent together run
    one after another, in order, never overlapping."""
    host = Host()
    worker = await started(host)
    log: list[tuple[str, int]] = []

    async def record(i: int) -> int:
        log.append(("in", i))
        await asyncio.sleep(0.001)
        log.append(("out", i))
        return i

    try:
        jobs = [host.job(record, i) for i in range(5)]
        plain = host.job(log.append, ("plain", -1))
        for job in (*jobs, plain):
            worker.send(job)
        assert not log
        assert [(await host.outcome(job))[0] for job in jobs] == list(range(5))
        await host.outcome(plain)
        assert log == [*((step, i) for i in range(5) for step in ("in", "out")), ("plain", -1)]
    finally:
        await worker.stop()


async def test_initializer_plain_or_async_runs_before_any_job() -> None:
    """The initializer runs at start, awaited when it returns an awaitable."""
    seen: list[str] = []

    async def async_init(tag: str) -> None:
        await asyncio.sleep(0)
        seen.append(tag)

    host = Host()
    for init in (seen.append, async_init):
        worker = await started(host, initializer=init, initargs=("ready",))
        assert seen == ["ready"]
        await worker.stop()
        seen.clear()


async def test_a_raising_initializer_fails_start() -> None:
    """start() raises WorkerStartupError naming the initializer's error, which is its
    cause; the worker is dead and cannot be started again."""
    host = Host()
    worker = LocalWorker(initializer=tasks.fail, initargs=("no config",))
    with pytest.raises(corral.WorkerStartupError, match="ValueError: no config") as caught:
        await worker.start(host)
    assert isinstance(caught.value.__cause__, ValueError)
    assert not worker.alive
    with pytest.raises(RuntimeError, match="cannot start"):
        await worker.start(host)
    await worker.stop()


async def test_bad_arguments_and_lifecycle_errors() -> None:
    """A non-callable initializer is refused at the call; a worker starts once; stop and
    kill on a worker never started return; stop is idempotent; a stopped worker refuses
    jobs."""
    with pytest.raises(TypeError, match="initializer must be callable"):
        LocalWorker(initializer="setup")  # type: ignore[arg-type]
    await LocalWorker().stop()
    await LocalWorker().kill()
    host = Host()
    worker = await started(host)
    with pytest.raises(RuntimeError, match="cannot start"):
        await worker.start(host)
    await worker.stop()
    await worker.stop()
    with pytest.raises(RuntimeError, match="cannot send"):
        worker.send(host.job(tasks.add, 1, 2))


async def test_soft_limit_cancels_a_coroutine() -> None:
    """At its soft limit a coroutine's task is cancelled: the caller gets
    SoftTimeLimitExceeded (caused by the cancellation), unless the coroutine handles the
    CancelledError and returns. A plain callable is not interrupted: its value counts."""
    host = Host()
    worker = await started(host)
    try:
        slow = host.job(asyncio.sleep, BOUND, soft=0.05)
        worker.send(slow)
        _, error = await host.outcome(slow)
        assert type(error) is corral.SoftTimeLimitExceeded
        assert error.limit == 0.05
        assert isinstance(error.__cause__, asyncio.CancelledError)
        assert 0.05 <= (host.run_times[slow.id] or 0) < BOUND
        handled = host.job(handle_cancel, asyncio.Event(), soft=0.05)
        worker.send(handled)
        assert await host.outcome(handled) == ("handled", None)
        plain = host.job(time.sleep, 0.02, soft=0.001)
        worker.send(plain)
        assert await host.outcome(plain) == (None, None)
        assert worker.alive
    finally:
        await worker.stop()


async def test_cancel_a_job_not_started_or_already_cancelled() -> None:
    """A job cancelled while queued, one already CANCELLED when sent, and one marked
    CANCELLED while queued never run; each is reported through job_done with
    CancelledError."""
    host = Host()
    worker = await started(host)
    running, release = asyncio.Event(), asyncio.Event()
    ran: list[str] = []
    try:
        busy = host.job(wait_until, running, release)
        queued, marked, early = (host.job(ran.append, n) for n in ("queued", "marked", "early"))
        last = host.job(ran.append, "last")
        early.state = JobState.CANCELLED
        for job in (busy, queued, marked, early, last):
            worker.send(job)
        await asyncio.wait_for(running.wait(), BOUND)
        worker.cancel(queued)
        _, error = await host.outcome(queued)
        assert isinstance(error, asyncio.CancelledError)
        assert not host.outcomes[busy.id].done()
        marked.state = JobState.CANCELLED
        release.set()
        for job in (marked, early):
            _, error = await host.outcome(job)
            assert isinstance(error, asyncio.CancelledError)
            assert ("started", job.id) not in host.events
            assert job.run_time is None
        assert await host.outcome(last) == (None, None)
        assert ran == ["last"]
    finally:
        release.set()
        await worker.stop()


async def test_cancel_a_running_coroutine() -> None:
    """Cancelling a running coroutine cancels its task; job_done reports CancelledError
    and the worker serves on without a loss."""
    host = Host()
    worker = await started(host)
    try:
        running = asyncio.Event()
        job = host.job(wait_until, running, asyncio.Event())
        worker.send(job)
        await asyncio.wait_for(running.wait(), BOUND)
        worker.cancel(job, grace=BOUND)
        _, error = await host.outcome(job)
        assert isinstance(error, asyncio.CancelledError)
        after = host.job(tasks.add, 1, 2)
        worker.send(after)
        assert await host.outcome(after) == (3, None)
        assert worker.alive
        assert not host.lost.done()
    finally:
        await worker.stop()


async def test_a_coroutine_ignoring_cancel_is_abandoned_after_grace() -> None:
    """A coroutine that swallows cancellation is still running after the grace period:
    the worker gives up, is dead, reports the job as started and the queued one as
    unstarted; the abandoned task's outcome is never reported."""
    host = Host()
    worker = await started(host)
    running, release = asyncio.Event(), asyncio.Event()
    caught: list[str] = []
    try:
        job = host.job(stubborn, running, release, caught)
        queued = host.job(tasks.add, 1, 1)
        worker.send(job)
        worker.send(queued)
        await asyncio.wait_for(running.wait(), BOUND)
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
    for _ in range(5):
        await asyncio.sleep(0)
    assert caught == ["cancelled", "cancelled"]  # once by cancel, once on giving up
    assert not host.outcomes[job.id].done()
    assert not host.outcomes[queued.id].done()
    await worker.stop()  # dead already: returns


async def test_grace_zero_gives_up_at_once() -> None:
    """cancel(grace=0) on a running coroutine gives the worker up on the next loop turn,
    even for a coroutine that would have stopped; its task is cancelled, its outcome
    ignored."""
    host = Host()
    worker = await started(host)
    running = asyncio.Event()
    job = host.job(handle_cancel, running)
    worker.send(job)
    await asyncio.wait_for(running.wait(), BOUND)
    worker.cancel(job, grace=0)
    _, unstarted, lost = await host.loss()
    assert (unstarted, lost) == ([], [job])
    assert not worker.alive
    for _ in range(5):
        await asyncio.sleep(0)
    assert not host.outcomes[job.id].done()


async def test_stop_finishes_the_jobs_already_sent() -> None:
    """stop() returns once every job already sent has run; no loss is reported."""
    host = Host()
    worker = await started(host)
    jobs = [host.job(asyncio.sleep, 0.01, i) for i in range(5)]
    for job in jobs:
        worker.send(job)
    async with asyncio.timeout(BOUND):
        await worker.stop()
    assert [host.outcomes[job.id].result() for job in jobs] == [(i, None) for i in range(5)]
    assert not worker.alive
    assert not host.lost.done()


async def test_kill_reports_what_it_held() -> None:
    """kill() reports the running job as started and the queued ones as unstarted, in
    order, and cancels the running task without waiting; an idle worker killed reports
    nothing."""
    host = Host()
    worker = await started(host)
    running, release = asyncio.Event(), asyncio.Event()
    busy = host.job(wait_until, running, release)
    queued = [host.job(tasks.add, i, i) for i in range(3)]
    for job in (busy, *queued):
        worker.send(job)
    await asyncio.wait_for(running.wait(), BOUND)
    await worker.kill()
    error, unstarted, lost = await host.loss()
    assert isinstance(error, corral.WorkerLostError)
    assert "killed" in str(error)
    assert (unstarted, lost) == (queued, [busy])
    assert not worker.alive
    for _ in range(5):
        await asyncio.sleep(0)
    assert not any(host.outcomes[job.id].done() for job in (busy, *queued))
    idle_host = Host()
    idle = await started(idle_host)
    await idle.kill()
    assert not idle.alive
    assert not idle_host.lost.done()


async def test_run_time_is_the_time_in_the_call() -> None:
    """run_time, set before job_done, is the time the call took (0.2 s: within 10%), for
    a coroutine and for a plain callable."""
    host = Host()
    worker = await started(host)
    try:
        for fn in (asyncio.sleep, time.sleep):
            job = host.job(fn, 0.2)
            worker.send(job)
            await host.outcome(job)
            run_time = host.run_times[job.id]
            assert run_time is not None
            assert 0.2 <= run_time < 0.22
    finally:
        await worker.stop()


# -- streams and reports -----------------------------------------------------------------


async def test_a_stream_runs_ahead_only_as_far_as_its_credit() -> None:
    """A stream makes exactly its credit of items, then waits for more while the worker
    serves other jobs; credit(n) lets it make n more; cancel closes the generator in the
    loop's thread and ends the job with CancelledError, after its items."""
    host = Host()
    worker = await started(host)
    produced, closed = [0], list[str]()
    job = send(worker, host.job(counting, produced, closed, window=10))
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
        assert closed == [threading.current_thread().name]
        assert host.run_times[job.id] is not None
        assert host.items[job.id] == list(range(15))
        assert worker.alive and not host.lost.done()
    finally:
        await worker.stop()


async def test_reports_and_items_come_in_order_before_done() -> None:
    """corral.report from a plain call, a coroutine and a generator reaches job_report in
    order before job_done (a generator's before the items made after it); the reporter
    is set only while the job runs."""
    host = Host()
    worker = await started(host)
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
async def test_stop_and_kill_close_open_streams_and_report_them_lost(end: str) -> None:
    """A worker stopped or killed with a stream open closes its generator (finally runs
    before stop or kill returns), as a process child does at EOF, and reports the stream
    as started in worker_lost."""
    host = Host()
    worker = await started(host)
    produced, closed = [0], list[str]()
    job = send(worker, host.job(counting, produced, closed, window=2))
    await host.until_items(job, 2)
    async with asyncio.timeout(BOUND):
        await (worker.stop() if end == "stop" else worker.kill())
    assert closed == [threading.current_thread().name]
    error, unstarted, lost = await host.loss()
    assert isinstance(error, corral.WorkerLostError)
    assert (unstarted, lost) == ([], [job])
    assert not worker.alive


# -- through a TaskQueue ---------------------------------------------------------------


async def test_task_queue_runs_calls_in_the_loop() -> None:
    """Through a TaskQueue: values, exceptions, coroutines, soft limits and cancellation
    as from the worker itself."""
    async with corral.TaskQueue() as queue:
        async with asyncio.timeout(BOUND):
            await queue.attach(LocalWorker())
            assert await queue.run(tasks.add, 2, 40) == 42
            assert await queue.run(async_add, 1, 1) == 2
            with pytest.raises(ValueError, match="boom"):
                await queue.run(async_fail, "boom")
            with pytest.raises(corral.SoftTimeLimitExceeded):
                await queue.run(asyncio.sleep, BOUND, soft_time_limit=0.05)
            running = asyncio.Event()
            job = queue.submit(wait_until, running, asyncio.Event())
            await running.wait()
            job.cancel()
            with pytest.raises(asyncio.CancelledError):
                await job
            assert await queue.run(tasks.add, 1, 1) == 2
