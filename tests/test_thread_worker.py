"""What is ``ThreadWorker``'s alone: its calls run in a thread of its own, where a coroutine
gets an event loop of that thread, and a plain call (or a stream making its batch) is
interrupted by an asynchronous exception, which may land at any bytecode. The contract it
shares with every worker kind (outcomes, order, cancellation, giving up on a call that
ignores it, streams, reports, a ``TaskQueue``) is in ``test_worker_contract.py``."""

from __future__ import annotations

import asyncio
import inspect
import random
import threading
import time
from collections.abc import Generator, Iterator

import pytest

import corral
from corral.workers._thread import ThreadWorker
from tests import tasks
from tests.hosts import BOUND, Host, send, started
from tests.test_worker_contract import spin, wait_for

# -- tasks -------------------------------------------------------------------------------


def catch_soft_limit(running: threading.Event) -> str:
    running.set()
    deadline = time.monotonic() + BOUND
    try:
        while time.monotonic() < deadline:
            pass
    except corral.SoftTimeLimitExceeded as exc:
        return f"caught {exc.limit:g}"
    return "no limit"


def stuck_after_first(running: threading.Event, closed: threading.Event) -> Iterator[int]:
    """Yield 0, then spin in Python bytecode (so an interrupt lands at once) until
    interrupted (BOUND s at most: a lost interrupt must not spin into later tests)."""
    try:
        yield 0
        running.set()
        deadline = time.monotonic() + BOUND
        while time.monotonic() < deadline:
            pass
    finally:
        closed.set()


async def coroutine_whoami(x: int) -> tuple[int, str, bool]:
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    return x, threading.current_thread().name, loop.is_running()


# -- tests -------------------------------------------------------------------------------


async def test_coroutine_functions_run_on_the_threads_own_loop() -> None:
    """A coroutine function's coroutine runs to its end on an event loop of the worker's
    thread, not the caller's."""
    host = Host()
    worker = await started(ThreadWorker(name="t-async"), host)
    try:
        jobs = [host.job(coroutine_whoami, i) for i in range(3)]
        for job in jobs:
            send(worker, job)
        for i, job in enumerate(jobs):
            assert await host.outcome(job) == ((i, "corral-t-async", True), None)
    finally:
        await worker.stop()


async def test_soft_limit_raises_inside_a_plain_call() -> None:
    """At its soft limit a running call gets SoftTimeLimitExceeded raised inside it: it
    may catch it; if not, the caller gets a plain SoftTimeLimitExceeded with the limit."""
    host = Host()
    worker = await started(ThreadWorker(), host)
    release = threading.Event()
    try:
        running = threading.Event()
        caught = host.job(catch_soft_limit, running, soft=0.1)
        send(worker, caught)
        assert await host.outcome(caught) == ("caught 0.1", None)
        running.clear()
        uncaught = host.job(spin, running, release, soft=0.1)
        send(worker, uncaught)
        value, error = await host.outcome(uncaught)
        assert value is None
        assert type(error) is corral.SoftTimeLimitExceeded
        assert error.limit == 0.1
        assert error.__traceback__ is not None
        assert 0.1 <= (host.run_times[uncaught.id] or 0) < BOUND
        after = host.job(tasks.add, 2, 2)  # the worker serves on
        send(worker, after)
        assert await host.outcome(after) == (4, None)
    finally:
        release.set()
        await worker.stop()


# -- streams ---------------------------------------------------------------------------


async def test_cancel_interrupts_a_stream_making_its_batch() -> None:
    """A stream cancelled while its generator runs gets CancelledError raised inside it:
    its finally runs, the items made before arrive, then the job ends cancelled."""
    host = Host()
    worker = await started(ThreadWorker(), host)
    running, closed = threading.Event(), threading.Event()
    job = host.job(stuck_after_first, running, closed, window=100)
    send(worker, job)
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


async def test_cancels_racing_stream_batches_lose_nothing() -> None:
    """Streams cancelled at random moments (before their call, between batches, while a
    batch is made) each end exactly once, with their items or CancelledError, and leave no
    generator open; the thread keeps serving."""
    host = Host()
    worker = await started(ThreadWorker(), host)
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


async def test_task_queue_hard_limit_fails_the_call() -> None:
    """Through a TaskQueue, a call past its hard limit fails with TimeLimitExceeded."""
    release = threading.Event()
    try:
        async with corral.TaskQueue() as queue:
            async with asyncio.timeout(BOUND):
                await queue.attach(ThreadWorker())
                with pytest.raises(corral.TimeLimitExceeded):
                    await queue.run(spin, threading.Event(), release, time_limit=0.1)
    finally:
        release.set()


async def test_interrupts_racing_the_end_of_calls_lose_nothing() -> None:
    """Soft limits and cancellations that fall just as calls begin or end (the host's
    timers race the thread) still give every job exactly one outcome, and the thread keeps
    serving."""
    host = Host()
    worker = await started(ThreadWorker(), host)
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
            send(worker, job)
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
