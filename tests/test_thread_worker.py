"""``ThreadWorker`` on its own, driven by a tiny host, and through a ``TaskQueue``: jobs run
one at a time in a dedicated thread, are interrupted there by asynchronous exceptions, and
a thread that will not stop is abandoned and reported lost."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import random
import threading
import time
from collections.abc import Generator, Iterator
from typing import Any

import pytest

import corral
from corral import JobState
from corral.workers._thread import ThreadWorker
from tests import tasks
from tests.hosts import Host, send

BOUND = 10.0


async def started(host: Host, name: str | None = None, **options: Any) -> ThreadWorker:
    """A ThreadWorker started for host."""
    worker = ThreadWorker(name=name, **options)
    async with asyncio.timeout(BOUND):
        await worker.start(host)
    return worker


async def wait_for(event: threading.Event) -> None:
    """Wait (bounded) for a threading.Event without blocking the loop."""
    assert await asyncio.to_thread(event.wait, BOUND)


async def thread_gone(name: str) -> None:
    """Wait (bounded) for the thread called name to end, then let the loop run what it
    posted before it ended."""
    for thread in threading.enumerate():
        if thread.name == name:
            await asyncio.to_thread(thread.join, BOUND)
            assert not thread.is_alive()
    for _ in range(5):
        await asyncio.sleep(0)


def thread_names() -> set[str]:
    return {thread.name for thread in threading.enumerate()}


# -- tasks -------------------------------------------------------------------------------


def whoami() -> str:
    return threading.current_thread().name


def block(running: threading.Event, release: threading.Event) -> str:
    running.set()
    release.wait(BOUND)
    return "released"


def spin(running: threading.Event, release: threading.Event) -> str:
    """Busy in Python bytecode (so an interrupt lands at once) until released."""
    running.set()
    while not release.is_set():
        pass
    return "released"


def stubborn(running: threading.Event, release: threading.Event, caught: list[str]) -> str:
    """Spins, swallowing every CancelledError, until released."""
    while not release.is_set():
        try:
            running.set()
            while not release.is_set():
                pass
        except asyncio.CancelledError:
            caught.append("cancelled")
    return "released"


def catch_soft_limit(running: threading.Event) -> str:
    running.set()
    deadline = time.monotonic() + BOUND
    try:
        while time.monotonic() < deadline:
            pass
    except corral.SoftTimeLimitExceeded as exc:
        return f"caught {exc.limit:g}"
    return "no limit"


def counting(produced: list[int], closed: threading.Event, where: list[str]) -> Iterator[int]:
    """Yield 0, 1, 2, ... forever, counting in produced[0]; note the thread it ends in."""
    try:
        for i in itertools.count():
            produced[0] += 1
            yield i
    finally:
        where.append(threading.current_thread().name)
        closed.set()


def stuck_after_first(running: threading.Event, closed: threading.Event) -> Iterator[int]:
    """Yield 0, then spin in Python bytecode (so an interrupt lands at once) for ever."""
    try:
        yield 0
        running.set()
        while True:
            pass
    finally:
        closed.set()


async def coroutine_report_each(n: int) -> str:
    for i in range(n):
        corral.report(i)
        await asyncio.sleep(0)
    return "finished"


async def coroutine_whoami(x: int) -> tuple[int, str, bool]:
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    return x, threading.current_thread().name, loop.is_running()


# -- tests -------------------------------------------------------------------------------


async def test_runs_jobs_in_its_thread_and_reports_outcomes() -> None:
    """A value and an exception come back through job_done, unwrapped, the exception with
    its own traceback; job_started comes first with the job RUNNING; every callback is made
    in the loop's thread; the calls run in the thread named corral-<name>."""
    host = Host()
    worker = await started(host, name="t1")
    try:
        assert worker.alive
        assert worker.pid is None
        ok, bad, who = host.job(tasks.add, 2, 3), host.job(tasks.fail, "boom"), host.job(whoami)
        for job in (ok, bad, who):
            worker.send(job)
            assert job.state in (JobState.SENT, JobState.RUNNING)
        assert await host.outcome(ok) == (5, None)
        value, error = await host.outcome(bad)
        assert value is None
        assert isinstance(error, ValueError)
        assert str(error) == "boom"
        assert error.__cause__ is None
        assert error.__traceback__ is not None
        assert error.__traceback__.tb_next is not None  # the frame of tasks.fail() is there
        assert await host.outcome(who) == ("corral-t1", None)
        assert host.events == [(kind, i) for i in (1, 2, 3) for kind in ("started", "done")]
        assert host.states_at_start == {
            1: JobState.RUNNING,
            2: JobState.RUNNING,
            3: JobState.RUNNING,
        }
        assert (worker.tasks_sent, worker.tasks_done) == (3, 3)
    finally:
        await worker.stop()
    assert not worker.alive
    assert "corral-t1" not in thread_names()


async def test_send_never_blocks_and_jobs_run_one_at_a_time_in_order() -> None:
    """send() returns while the thread is busy; the jobs sent run afterwards, in order,
    never two at once."""
    host = Host()
    worker = await started(host)
    running, release = threading.Event(), threading.Event()
    log: list[tuple[str, int]] = []

    def record(i: int) -> int:
        log.append(("in", i))
        time.sleep(0.002)
        log.append(("out", i))
        return i

    try:
        first = host.job(block, running, release)
        worker.send(first)
        await wait_for(running)
        jobs = [host.job(record, i) for i in range(5)]
        for job in jobs:
            worker.send(job)
        assert not log  # queued behind the busy call
        release.set()
        assert [(await host.outcome(job))[0] for job in jobs] == list(range(5))
        assert log == [(step, i) for i in range(5) for step in ("in", "out")]
    finally:
        release.set()
        await worker.stop()


async def test_coroutine_functions_run_on_the_threads_own_loop() -> None:
    """A coroutine function's coroutine runs to its end on an event loop of the worker's
    thread, not the caller's."""
    host = Host()
    worker = await started(host, name="t-async")
    try:
        jobs = [host.job(coroutine_whoami, i) for i in range(3)]
        for job in jobs:
            worker.send(job)
        for i, job in enumerate(jobs):
            assert await host.outcome(job) == ((i, "corral-t-async", True), None)
    finally:
        await worker.stop()


async def test_initializer_runs_in_the_thread_first() -> None:
    """The initializer runs in the worker's thread before any job."""
    seen: list[str] = []
    host = Host()
    worker = await started(
        host, name="t-init", initializer=lambda tag: seen.append(tag + whoami()), initargs=("x",)
    )
    try:
        assert seen == ["xcorral-t-init"]
        job = host.job(tasks.add, 1, 1)
        worker.send(job)
        assert await host.outcome(job) == (2, None)
    finally:
        await worker.stop()


async def test_a_raising_initializer_fails_start_and_leaves_nothing() -> None:
    """start() raises WorkerStartupError naming the initializer's error, which is its
    cause; the thread has ended when it raises, and the worker cannot be started again."""
    host = Host()
    worker = ThreadWorker(name="t-badinit", initializer=tasks.fail, initargs=("no config",))
    with pytest.raises(corral.WorkerStartupError, match="ValueError: no config") as caught:
        async with asyncio.timeout(BOUND):
            await worker.start(host)
    assert isinstance(caught.value.__cause__, ValueError)
    assert not worker.alive
    assert "corral-t-badinit" not in thread_names()
    with pytest.raises(RuntimeError, match="cannot start"):
        await worker.start(host)
    await worker.stop()  # nothing to do
    assert not host.lost.done()


async def test_bad_arguments_and_lifecycle_errors() -> None:
    """A non-callable initializer is refused at the call; a worker starts once; stop and
    kill on a worker never started return; stop is idempotent."""
    with pytest.raises(TypeError, match="initializer must be callable"):
        ThreadWorker(initializer=42)  # type: ignore[arg-type]
    await ThreadWorker().stop()
    await ThreadWorker().kill()
    host = Host()
    worker = await started(host)
    with pytest.raises(RuntimeError, match="cannot start"):
        await worker.start(host)
    await worker.stop()
    await worker.stop()
    with pytest.raises(RuntimeError, match="cannot send"):
        worker.send(host.job(tasks.add, 1, 2))


async def test_soft_limit_raises_inside_a_plain_call() -> None:
    """At its soft limit a running call gets SoftTimeLimitExceeded raised inside it: it
    may catch it; if not, the caller gets a plain SoftTimeLimitExceeded with the limit."""
    host = Host()
    worker = await started(host)
    release = threading.Event()
    try:
        running = threading.Event()
        caught = host.job(catch_soft_limit, running, soft=0.1)
        worker.send(caught)
        assert await host.outcome(caught) == ("caught 0.1", None)
        running.clear()
        uncaught = host.job(spin, running, release, soft=0.1)
        worker.send(uncaught)
        value, error = await host.outcome(uncaught)
        assert value is None
        assert type(error) is corral.SoftTimeLimitExceeded
        assert error.limit == 0.1
        assert error.__traceback__ is not None
        assert 0.1 <= (host.run_times[uncaught.id] or 0) < BOUND
        after = host.job(tasks.add, 2, 2)  # the worker serves on
        worker.send(after)
        assert await host.outcome(after) == (4, None)
    finally:
        release.set()
        await worker.stop()


async def test_soft_limit_cancels_a_coroutine() -> None:
    """A coroutine past its soft limit is cancelled in the thread's loop; the caller gets
    SoftTimeLimitExceeded, caused by the cancellation."""
    host = Host()
    worker = await started(host)
    try:
        job = host.job(asyncio.sleep, BOUND, soft=0.1)
        worker.send(job)
        _, error = await host.outcome(job)
        assert type(error) is corral.SoftTimeLimitExceeded
        assert isinstance(error.__cause__, asyncio.CancelledError)
    finally:
        await worker.stop()


async def test_cancel_a_job_not_started_or_already_cancelled() -> None:
    """A job cancelled while queued, or one whose state is CANCELLED when its turn comes,
    never runs; each is reported through job_done with CancelledError, freeing its slot."""
    host = Host()
    worker = await started(host)
    running, release = threading.Event(), threading.Event()
    ran: list[str] = []
    try:
        busy = host.job(block, running, release)
        queued = host.job(ran.append, "queued")
        marked = host.job(ran.append, "marked")
        last = host.job(ran.append, "last")
        for job in (busy, queued, marked, last):
            worker.send(job)
        await wait_for(running)
        worker.cancel(queued)
        value, error = await host.outcome(queued)
        assert (value, type(error)) == (None, asyncio.CancelledError)
        assert ("started", queued.id) not in host.events
        marked.state = JobState.CANCELLED
        release.set()
        _, error = await host.outcome(marked)
        assert isinstance(error, asyncio.CancelledError)
        assert await host.outcome(last) == (None, None)
        assert ran == ["last"]
    finally:
        release.set()
        await worker.stop()


async def test_cancel_interrupts_a_running_call_and_the_worker_serves_on() -> None:
    """Cancelling a running plain call raises CancelledError inside it; it stops, job_done
    reports it, and the same thread serves the next job (no loss)."""
    host = Host()
    worker = await started(host)
    running, release = threading.Event(), threading.Event()
    try:
        job = host.job(spin, running, release)
        worker.send(job)
        await wait_for(running)
        worker.cancel(job, grace=BOUND)
        _, error = await host.outcome(job)
        assert isinstance(error, asyncio.CancelledError)
        coro = host.job(asyncio.sleep, BOUND)
        worker.send(coro)
        while ("started", coro.id) not in host.events:
            await asyncio.sleep(0.01)
        worker.cancel(coro, grace=BOUND)
        _, error = await host.outcome(coro)
        assert isinstance(error, asyncio.CancelledError)
        after = host.job(tasks.add, 1, 2)
        worker.send(after)
        assert await host.outcome(after) == (3, None)
        assert worker.alive
        assert not host.lost.done()
    finally:
        release.set()
        await worker.stop()


async def test_a_call_ignoring_cancel_is_abandoned_after_grace() -> None:
    """A call that swallows CancelledError is still running after the grace period: the
    worker gives up, is dead, and reports the call as started and the queued job as
    unstarted; the abandoned thread's outcome is never reported."""
    host = Host()
    worker = await started(host, name="t-stubborn")
    running, release = threading.Event(), threading.Event()
    caught: list[str] = []
    try:
        job = host.job(stubborn, running, release, caught)
        queued = host.job(tasks.add, 1, 1)
        worker.send(job)
        worker.send(queued)
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
        assert caught == ["cancelled"]
    finally:
        release.set()
    await thread_gone("corral-t-stubborn")
    assert not host.outcomes[job.id].done()
    assert not host.outcomes[queued.id].done()
    await worker.stop()  # dead already: returns


async def test_grace_zero_gives_up_at_once() -> None:
    """cancel(grace=0) on a running call abandons the worker without waiting, even for a
    call that would have stopped; the call then gets CancelledError and its thread ends."""
    host = Host()
    worker = await started(host, name="t-grace0")
    running, release = threading.Event(), threading.Event()
    try:
        job = host.job(spin, running, release)
        worker.send(job)
        await wait_for(running)
        worker.cancel(job, grace=0)
        _, unstarted, lost = await host.loss()
        assert (unstarted, lost) == ([], [job])
        assert not worker.alive
        await thread_gone("corral-t-grace0")  # interrupted, without being released
    finally:
        release.set()
    assert not host.outcomes[job.id].done()


async def test_stop_finishes_the_jobs_already_sent() -> None:
    """stop() lets every job already sent run, then the thread exits and is joined; no
    loss is reported."""
    host = Host()
    worker = await started(host, name="t-stop")
    jobs = [host.job(time.sleep, 0.01) for _ in range(5)]
    for job in jobs:
        worker.send(job)
    async with asyncio.timeout(BOUND):
        await worker.stop()
    assert all(host.outcomes[job.id].result() == (None, None) for job in jobs)
    assert "corral-t-stop" not in thread_names()
    assert not worker.alive
    assert not host.lost.done()


async def test_kill_reports_what_it_held() -> None:
    """kill() reports the running job as started and the queued ones as unstarted, in
    order, and returns without waiting for the running call; the call's later outcome is
    ignored."""
    host = Host()
    worker = await started(host, name="t-kill")
    running, release = threading.Event(), threading.Event()
    try:
        busy = host.job(block, running, release)
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
    await thread_gone("corral-t-kill")
    assert not any(host.outcomes[job.id].done() for job in (busy, *queued))


async def test_kill_when_idle_ends_the_thread_and_reports_nothing() -> None:
    """An idle worker killed on purpose reports no loss, and its thread is gone when kill()
    returns."""
    host = Host()
    worker = await started(host, name="t-idle")
    async with asyncio.timeout(BOUND):
        await worker.kill()
    assert "corral-t-idle" not in thread_names()
    assert not host.lost.done()


async def test_run_time_is_the_time_in_the_call() -> None:
    """run_time, set before job_done, is the time spent in the call (0.2 s sleep: within
    10%)."""
    host = Host()
    worker = await started(host)
    try:
        job = host.job(time.sleep, 0.2)
        worker.send(job)
        await host.outcome(job)
        run_time = host.run_times[job.id]
        assert run_time is not None
        assert 0.2 <= run_time < 0.22
        skipped = host.job(tasks.add, 1, 1)
        skipped.state = JobState.CANCELLED
        worker.send(skipped)
        await host.outcome(skipped)
        assert host.run_times[skipped.id] is None  # it never ran
    finally:
        await worker.stop()


# -- streams and reports -----------------------------------------------------------------


async def test_a_stream_runs_ahead_only_as_far_as_its_credit() -> None:
    """A stream makes exactly its credit of items, then waits for more while the worker
    serves other jobs; credit(n) lets it make n more; cancel closes the generator in the
    worker's thread and ends the job with CancelledError, after its items."""
    host = Host()
    worker = await started(host, name="streamer")
    produced, closed, where = [0], threading.Event(), list[str]()
    job = host.job(counting, produced, closed, where, window=10)
    worker.send(job)
    try:
        assert await host.until_items(job, 10) == list(range(10))
        other = host.job(tasks.add, 1, 2)
        worker.send(other)
        assert await host.outcome(other) == (3, None)  # served while the stream waits
        assert produced == [10]
        worker.credit(job, 5)
        assert await host.until_items(job, 15) == list(range(15))
        other = host.job(tasks.add, 2, 2)
        worker.send(other)
        assert await host.outcome(other) == (4, None)
        assert produced == [15]
        worker.cancel(job)
        _, error = await host.outcome(job)
        assert isinstance(error, asyncio.CancelledError)
        assert closed.is_set() and where == ["corral-streamer"]
        assert host.run_times[job.id] is not None
        assert host.items[job.id] == list(range(15))
        assert worker.alive and not host.lost.done()
    finally:
        await worker.stop()


async def test_cancel_interrupts_a_stream_making_its_batch() -> None:
    """A stream cancelled while its generator runs gets CancelledError raised inside it:
    its finally runs, the items made before arrive, then the job ends cancelled."""
    host = Host()
    worker = await started(host)
    running, closed = threading.Event(), threading.Event()
    job = host.job(stuck_after_first, running, closed, window=100)
    worker.send(job)
    try:
        await wait_for(running)
        worker.cancel(job, grace=BOUND)
        _, error = await host.outcome(job)
        assert isinstance(error, asyncio.CancelledError)
        assert closed.is_set()
        assert host.items[job.id] == [0]
        assert await host.outcome(send(worker, host.job(tasks.add, 1, 1))) == (2, None)
    finally:
        await worker.stop()


async def test_reports_and_items_come_in_order_before_done() -> None:
    """corral.report from a plain call, a coroutine and a generator reaches job_report in
    order, in the loop's thread, before job_done (a generator's before the items made
    after it)."""
    host = Host()
    worker = await started(host)
    try:
        for fn in (tasks.report_numbers, coroutine_report_each):
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


@pytest.mark.parametrize("end", ["stop", "kill"])
async def test_stop_and_kill_close_open_streams_and_report_them_lost(end: str) -> None:
    """A worker stopped or killed with a stream open closes its generator in its thread
    (finally runs), as a process child does at EOF, and reports the stream as started in
    worker_lost."""
    host = Host()
    name = f"ending-{end}"
    worker = await started(host, name=name)
    produced, closed, where = [0], threading.Event(), list[str]()
    job = send(worker, host.job(counting, produced, closed, where, window=2))
    await host.until_items(job, 2)
    async with asyncio.timeout(BOUND):
        await (worker.stop() if end == "stop" else worker.kill())
    error, unstarted, lost = await host.loss()
    assert isinstance(error, corral.WorkerLostError)
    assert (unstarted, lost) == ([], [job])
    await wait_for(closed)
    assert where == [f"corral-{name}"]
    await thread_gone(f"corral-{name}")
    assert not worker.alive


async def test_cancels_racing_stream_batches_lose_nothing() -> None:
    """Streams cancelled at random moments (before their call, between batches, while a
    batch is made) each end exactly once, with their items or CancelledError, and leave no
    generator open; the thread keeps serving."""
    host = Host()
    worker = await started(host)
    rng = random.Random(11)
    made: list[Generator[int, None, None]] = []

    def tracked(n: int) -> Generator[int, None, None]:
        generator = (i for i in range(n) if sum(range(20)) >= 0)  # ~1 us an item
        made.append(generator)
        return generator

    try:
        for _ in range(60):
            job = send(worker, host.job(tracked, 3000, window=rng.choice([5, 500, 5000])))
            await asyncio.sleep(rng.random() * 0.002)
            worker.cancel(job, grace=BOUND)
            _, error = await host.outcome(job)
            assert error is None or isinstance(error, asyncio.CancelledError)
            if error is None:
                assert host.items[job.id] == list(range(3000))
            # Finished or closed; or never begun (cancelled as its call returned).
            assert all(inspect.getgeneratorstate(g) != inspect.GEN_SUSPENDED for g in made)
        assert await host.outcome(send(worker, host.job(tasks.add, 1, 1))) == (2, None)
        assert worker.alive and not host.lost.done()
    finally:
        await worker.stop()


# -- through a TaskQueue ---------------------------------------------------------------


async def test_task_queue_runs_calls_on_thread_workers() -> None:
    """Through a TaskQueue: values, exceptions, coroutines and soft limits as from the
    worker itself."""
    async with corral.TaskQueue() as queue:
        async with asyncio.timeout(BOUND):
            await queue.attach(ThreadWorker())
            assert await queue.run(tasks.add, 2, 40) == 42
            with pytest.raises(ValueError, match="boom"):
                await queue.run(tasks.fail, "boom")
            assert (await queue.run(coroutine_whoami, 7))[0] == 7
            with pytest.raises(corral.SoftTimeLimitExceeded):
                await queue.run(asyncio.sleep, BOUND, soft_time_limit=0.05)


async def test_task_queue_cancel_and_hard_limit() -> None:
    """Cancelling a running job interrupts it in its thread and the worker serves on; a
    hard limit fails the call with TimeLimitExceeded."""
    running, release = threading.Event(), threading.Event()
    try:
        async with corral.TaskQueue() as queue:
            async with asyncio.timeout(BOUND):
                await queue.attach(ThreadWorker())
                job = queue.submit(spin, running, release)
                await wait_for(running)
                job.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await job
                assert await queue.run(tasks.add, 1, 1) == 2
                with pytest.raises(corral.TimeLimitExceeded):
                    await queue.run(spin, threading.Event(), release, time_limit=0.1)
    finally:
        release.set()


async def test_interrupts_racing_the_end_of_calls_lose_nothing() -> None:
    """Soft limits and cancellations that fall just as calls begin or end (the host's
    timers race the thread) still give every job exactly one outcome, and the thread keeps
    serving."""
    host = Host()
    worker = await started(host)
    rng = random.Random(7)

    def busy(seconds: float) -> float:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            pass
        return seconds

    try:
        errors: set[type[BaseException] | None] = set()
        for i in range(100):
            job = host.job(busy, rng.random() * 0.01, soft=0.003)
            worker.send(job)
            if i % 2:
                await asyncio.sleep(rng.random() * 0.01)
                worker.cancel(job, grace=BOUND)
            _, error = await host.outcome(job)
            errors.add(None if error is None else type(error))
        assert errors <= {None, asyncio.CancelledError, corral.SoftTimeLimitExceeded}
        assert None in errors
        assert worker.alive
        assert not host.lost.done()
    finally:
        await worker.stop()
