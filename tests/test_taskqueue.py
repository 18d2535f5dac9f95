"""``TaskQueue`` on its own: workers of every kind attached to one queue, priorities observed
on a busy worker, series routing and the error for a series nobody serves, detach, and
pools of thread and local workers."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
from typing import Any, TypeVar

import pytest

import corral
from corral.workers import LocalWorker, ProcessWorker, ThreadWorker, Worker
from tests import tasks
from tests.waits import bounded, until

T = TypeVar("T")
BOUND = 60.0


def make_worker(kind: str, **options: Any) -> Worker:
    if kind == "process":
        return ProcessWorker(start_method="fork", **options)
    if kind == "thread":
        return ThreadWorker(**options)
    return LocalWorker(**options)


KINDS = ["local", "thread", "process"]


# -- a mixed queue ----------------------------------------------------------------------------


async def test_mixed_queue_runs_1000_calls_correctly() -> None:
    """Local, thread and process workers serve one queue: 1,000 calls, every result right,
    and every kind took a share."""
    async with corral.TaskQueue(strategy="prefetch") as queue:
        workers = [make_worker(kind) for kind in KINDS for _ in range(2)]
        await bounded(asyncio.gather(*(queue.attach(w) for w in workers)))
        jobs = [queue.submit(tasks.square, i) for i in range(1000)]
        results = await bounded(asyncio.gather(*jobs))
        assert results == [i * i for i in range(1000)]
        assert sum(w.tasks_done for w in workers) == 1000
        for worker in workers:
            assert worker.tasks_done > 0, f"{worker} took no job"
        where = await bounded(asyncio.gather(*(queue.run(tasks.where) for _ in range(50))))
        assert {pid for pid, _ in where} >= {os.getpid()}
    assert not any(w.alive for w in workers)


@pytest.mark.parametrize("kind", KINDS)
async def test_coroutine_functions_run_on_every_kind(kind: str) -> None:
    async with corral.TaskQueue() as queue:
        await bounded(queue.attach(make_worker(kind)))
        assert await bounded(queue.run(tasks.async_square, 7)) == 49


async def test_map_of_a_coroutine_function_in_processes() -> None:
    async with corral.Pool(2, start_method="fork") as pool:
        assert await bounded(pool.map(tasks.async_square, range(40))) == [i * i for i in range(40)]


async def test_attach_twice_or_a_started_worker_is_refused() -> None:
    async with corral.TaskQueue() as queue:
        worker = LocalWorker()
        await bounded(queue.attach(worker))
        with pytest.raises(ValueError, match="already attached"):
            queue.attach(worker)
        async with corral.TaskQueue() as other:
            with pytest.raises(ValueError, match="started already"):
                other.attach(worker)


async def test_jobs_submitted_before_any_worker_wait_for_one() -> None:
    async with corral.TaskQueue() as queue:
        job = queue.submit(tasks.add, 1, 2)
        await asyncio.sleep(0)
        assert not job.done()
        queue.attach(ThreadWorker())
        assert await bounded(job) == 3


# -- priority -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_priority_order_on_a_single_busy_worker(kind: str) -> None:
    """With the only worker busy, 100 jobs of random priorities complete in ascending
    priority order, first in first out among equals; none preempts the running one."""
    async with corral.TaskQueue() as queue:
        await bounded(queue.attach(make_worker(kind)))
        order: list[int] = []
        blocker = queue.submit(tasks.identity, -1)
        blocker.add_done_callback(lambda job: order.append(-1))
        rng = random.Random(5)
        priorities = [rng.randrange(10) for _ in range(100)]
        jobs = []
        # No await between these submits: the worker cannot finish the blocker before
        # all 100 are queued behind it.
        for i, priority in enumerate(priorities):
            job = queue.submit(tasks.identity, i, priority=priority)
            job.add_done_callback(lambda job, i=i: order.append(i))
            jobs.append(job)
        await bounded(asyncio.gather(blocker, *jobs))
        expected = [-1, *sorted(range(100), key=lambda i: (priorities[i], i))]
        assert order == expected


async def test_urgent_job_overtakes_queued_ones() -> None:
    async with corral.TaskQueue() as queue:
        await bounded(queue.attach(ThreadWorker()))
        done: list[str] = []
        first = queue.submit(tasks.identity, "first")
        late = [queue.submit(tasks.identity, f"late{i}") for i in range(3)]
        urgent = queue.submit(tasks.identity, "urgent", priority=-5)
        for job in (first, *late, urgent):
            job.add_done_callback(lambda job: done.append(job.result()))
        await bounded(asyncio.gather(first, urgent, *late))
        assert done == ["first", "urgent", "late0", "late1", "late2"]


# -- series -------------------------------------------------------------------------------------


async def test_series_routes_jobs_to_qualified_workers() -> None:
    """A job of series io runs only on the io worker, cpu only on the cpu worker, and a job
    of no series on either."""
    async with corral.TaskQueue(strategy="prefetch") as queue:
        io = ThreadWorker(series=["io"], name="io-thread")
        cpu = ProcessWorker(series=["cpu"], start_method="fork")
        await bounded(asyncio.gather(queue.attach(io), queue.attach(cpu)))
        io_runs = await bounded(
            asyncio.gather(*(queue.run(tasks.where, series="io") for _ in range(30)))
        )
        cpu_runs = await bounded(
            asyncio.gather(*(queue.run(tasks.where, series="cpu") for _ in range(30)))
        )
        assert set(io_runs) == {(os.getpid(), "corral-io-thread")}
        assert {pid for pid, _ in cpu_runs} == {cpu.pid}
        free = await bounded(asyncio.gather(*(queue.run(tasks.square, i) for i in range(40))))
        assert free == [i * i for i in range(40)]


async def test_series_nobody_serves_is_an_error_at_submit() -> None:
    async with corral.TaskQueue() as queue:
        await bounded(queue.attach(ThreadWorker(series=["io"])))
        with pytest.raises(ValueError, match=r"serves series='gpu'.*\['io'\].*series=\['gpu'\]"):
            queue.submit(tasks.identity, 1, series="gpu")
        with pytest.raises(ValueError, match="series='gpu'"):
            await queue.run(tasks.identity, 1, series="gpu")
        assert await bounded(queue.run(tasks.identity, 2, series="io")) == 2


async def test_pending_jobs_fail_when_their_last_qualified_worker_leaves() -> None:
    """Jobs waiting for the only worker of their series fail with the series error when it
    is detached, instead of waiting forever; other jobs are untouched."""
    async with corral.TaskQueue() as queue:
        gate = threading.Event()
        io = ThreadWorker(series=["io"])
        other = ThreadWorker(series=["cpu"])
        await bounded(asyncio.gather(queue.attach(io), queue.attach(other)))
        running = queue.submit(gate.wait, 30, series="io")
        waiting = [queue.submit(tasks.identity, i, series="io") for i in range(3)]
        detaching = asyncio.ensure_future(queue.detach(io))
        await asyncio.sleep(0)
        for job in waiting:
            with pytest.raises(ValueError, match="serves series='io'"):
                await bounded(job)
        gate.set()
        assert await bounded(running) is True  # the detached worker finished what it held
        await bounded(detaching)
        assert await bounded(queue.run(tasks.identity, 5, series="cpu")) == 5
        assert queue.workers == [other]


def test_series_as_a_bare_string_is_refused() -> None:
    with pytest.raises(TypeError, match=r"series=\['io'\]"):
        ThreadWorker(series="io")  # type: ignore[arg-type]


# -- detach -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_detach_finishes_held_jobs_and_loses_none(kind: str) -> None:
    """Detaching a prefetching worker mid-stream: every job completes exactly once, on
    whichever worker, and the detached worker is gone."""
    async with corral.TaskQueue(strategy="prefetch", prefetch=8) as queue:
        leaving = make_worker(kind)
        staying = ThreadWorker()
        await bounded(asyncio.gather(queue.attach(leaving), queue.attach(staying)))
        jobs = [queue.submit(tasks.square, i) for i in range(500)]
        await bounded(queue.detach(leaving))
        assert not leaving.alive
        assert await bounded(asyncio.gather(*jobs)) == [i * i for i in range(500)]
        assert leaving.tasks_done + staying.tasks_done == 500
        with pytest.raises(ValueError, match="not attached"):
            await queue.detach(leaving)


async def test_worker_that_fails_to_start_raises_from_attach() -> None:
    async with corral.TaskQueue() as queue:
        with pytest.raises(corral.WorkerStartupError, match="initializer raised ValueError"):
            await bounded(queue.attach(ThreadWorker(initializer=tasks.fail, initargs=("no",))))
        assert queue.workers == []


# -- pools of other kinds -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["thread", "local"])
async def test_pool_of_kind(kind: str) -> None:
    async with corral.Pool(3, kind=kind) as pool:  # type: ignore[arg-type]
        assert [w.kind for w in pool.workers] == [kind] * 3
        assert await bounded(pool.map(tasks.square, range(100))) == [i * i for i in range(100)]
        assert await bounded(pool.run(tasks.async_square, 3)) == 9
        squares = await bounded(pool.map(tasks.async_square, range(50)))  # chunked
        assert squares == [i * i for i in range(50)]
        runs = await bounded(asyncio.gather(*(pool.run(tasks.where) for _ in range(10))))
        assert {pid for pid, _ in runs} == {os.getpid()}


def test_pool_kind_and_its_options_are_checked() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        corral.Pool(1, kind="fibre")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start_method applies to process workers"):
        corral.Pool(1, kind="thread", start_method="fork")
    with pytest.raises(ValueError, match="max_memory_per_child applies to process workers"):
        corral.Pool(1, kind="local", max_memory_per_child=10**9)


async def test_thread_pool_recycles_threads() -> None:
    async with corral.Pool(1, kind="thread", max_tasks_per_child=2) as pool:
        names = [name for _, name in [await bounded(pool.run(tasks.where)) for _ in range(6)]]
        assert len(set(names)) == 3


# -- strategy="auto" --------------------------------------------------------------------------


async def test_auto_strategy_prefetches_only_after_short_calls(tmp_path: Any) -> None:
    """Under "auto" a process worker whose last call was short is sent several calls at
    once; after a call of 2 ms or more it is sent one at a time."""
    async with corral.TaskQueue(strategy="auto", prefetch=4) as queue:
        await bounded(queue.attach(make_worker("process")))
        assert await bounded(queue.run(tasks.square, 3)) == 9  # short: capacity 4 now
        flag = tmp_path / "go"
        blocker = queue.submit(tasks.wait_for_file, str(flag), BOUND)
        behind = [queue.submit(tasks.square, i) for i in range(3)]
        assert all(job.state is not corral.JobState.PENDING for job in behind)
        flag.touch()
        await bounded(asyncio.gather(blocker, *behind))
        assert await bounded(queue.run(tasks.sleep, 0.05)) == 0.05  # long: capacity 1
        flag.unlink()
        blocker = queue.submit(tasks.wait_for_file, str(flag), BOUND)
        behind = [queue.submit(tasks.square, i) for i in range(3)]
        assert [job.state for job in behind] == [corral.JobState.PENDING] * 3
        flag.touch()
        assert await bounded(asyncio.gather(*behind)) == [0, 1, 4]
        await bounded(blocker)


async def test_a_strategy_not_known_is_refused() -> None:
    """A strategy or prefetch that is not one of the known ones fails at the call."""
    with pytest.raises(ValueError, match="strategy must be one of"):
        corral.TaskQueue(strategy="eager")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefetch must be a positive int"):
        corral.TaskQueue(strategy="auto", prefetch=0)


# -- closing with no worker left ------------------------------------------------------------


async def test_closing_a_queue_without_workers_fails_its_queued_jobs() -> None:
    """A queue with no worker takes jobs for the first one to come; closing, it takes no
    new worker, so its queued jobs fail with ``PoolClosedError`` and ``close`` returns."""
    queue = corral.TaskQueue()
    job = queue.submit(tasks.square, 3)
    await bounded(queue.close())
    with pytest.raises(corral.PoolClosedError, match="closing with no worker left"):
        await bounded(job)


async def test_a_queue_whose_last_worker_dies_while_closing_fails_what_waits(
    tmp_path: Any,
) -> None:
    """The only worker dies while the queue closes: its running job fails with
    ``WorkerLostError``, the job still queued with ``PoolClosedError``, and ``close``
    returns instead of waiting for a worker that can no longer be attached."""
    queue = corral.TaskQueue()
    worker = make_worker("process")
    await bounded(queue.attach(worker))
    # A hard limit makes the worker acknowledge the start: the job is then RUNNING.
    running = queue.submit(tasks.wait_for_file, str(tmp_path / "never"), BOUND, time_limit=BOUND)
    waiting = queue.submit(tasks.square, 2)
    await until(lambda: running.state is corral.JobState.RUNNING)
    closing = asyncio.ensure_future(queue.close())
    await until(lambda: queue.closed)
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGKILL)
    await bounded(closing)
    with pytest.raises(corral.WorkerLostError):
        await bounded(running)
    with pytest.raises(corral.PoolClosedError):
        await bounded(waiting)
