"""The queue's rules, driven by ``tests.fakes.ScriptedWorker``: no process, no thread, no
timing. Each test scripts what its workers do (acknowledge, finish, die) and checks what
``corral.TaskQueue`` does about it through its public API: which job goes to which worker
and when, and how each job ends.

The rules: a dead worker's unstarted jobs go back to the front of the queue, in order,
while its started ones fail with its ``WorkerLostError`` or run again while they have
retries; a job whose delivery killed ``MAX_DELIVERIES`` workers fails; a worker being
detached takes no new job and stops once it has finished those it holds; broadcasts are
replayed on a new worker, in order, before it serves; "fair" sends a worker one job at a
time, "prefetch" up to ``prefetch``; lower priority first, FIFO among equals; series
route jobs; cancelling a pending job drops it, cancelling a sent one asks its worker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

import corral
from corral import Job, TaskQueue

# The lead engineer is moving the queue's internals; the bound lives with the queue.
from corral._taskqueue import MAX_DELIVERIES
from tests import tasks, waits
from tests.fakes import BOUND, ScriptedWorker


@contextlib.asynccontextmanager
async def queue_of(**options: Any) -> AsyncIterator[TaskQueue]:
    """A TaskQueue made with options, closed (bounded) when the test passes and
    terminated when it fails: close() would wait for ever for the jobs a scripted worker
    still holds."""
    async with TaskQueue(**options) as queue:
        try:
            yield queue
            async with asyncio.timeout(BOUND):
                await queue.close()
        except BaseException:
            await queue.terminate()
            raise


async def attached(queue: TaskQueue, *workers: ScriptedWorker) -> None:
    """Attach each worker and wait (bounded) until it serves."""
    async with asyncio.timeout(BOUND):
        for worker in workers:
            await queue.attach(worker)


async def outcome(job: Job[Any]) -> tuple[Any, BaseException | None]:
    """(value, None) or (None, error) of a job that should be done by now (bounded)."""
    async with asyncio.timeout(BOUND):
        try:
            return await job, None
        except BaseException as exc:  # CancelledError included: it is an outcome here
            return None, exc


async def test_a_dead_workers_unstarted_jobs_go_back_to_the_front_in_order() -> None:
    """A worker dies holding one started job and two it never began: the started job
    fails with the worker's own error; the two others go back ahead of the job that was
    waiting, in their order, and the next worker gets them first."""
    async with queue_of(strategy="prefetch", prefetch=3) as queue:
        first = ScriptedWorker()
        await attached(queue, first)
        jobs = [queue.submit(tasks.add, i, i) for i in range(4)]
        assert first.held == jobs[:3]  # the fourth waits: prefetch=3
        first.acknowledge(jobs[0])
        error = corral.WorkerLostError(first.name, None, 9, "scripted")
        first.die(error)
        _, failure = await outcome(jobs[0])
        assert failure is error
        assert not any(job.done() for job in jobs[1:])
        second = ScriptedWorker()
        await attached(queue, second)
        assert second.held == [jobs[1], jobs[2], jobs[3]]
        for job in second.held[:]:
            second.finish(job, job.id)
        assert [await outcome(job) for job in jobs[1:]] == [(job.id, None) for job in jobs[1:]]


async def test_a_started_job_runs_again_while_it_has_retries() -> None:
    """A started job with retries=1 whose worker dies goes back to the queue and runs on
    the next worker; when that worker dies too, it has none left and fails."""
    async with queue_of() as queue:
        workers = [ScriptedWorker() for _ in range(3)]
        await attached(queue, workers[0])
        job = queue.submit(tasks.add, 1, 2, retries=1)
        workers[0].acknowledge(job)
        workers[0].die()
        assert not job.done()
        await attached(queue, workers[1])
        assert workers[1].held == [job]
        workers[1].acknowledge(job)
        error = corral.WorkerLostError(workers[1].name, 1, None)
        workers[1].die(error)
        assert (await outcome(job))[1] is error
        await attached(queue, workers[2])
        assert workers[2].received == []


async def test_a_retried_job_goes_ahead_of_those_waiting() -> None:
    """A started job sent back for a retry runs before the jobs that were waiting when
    its worker died."""
    async with queue_of() as queue:
        first = ScriptedWorker()
        await attached(queue, first)
        retried = queue.submit(tasks.add, 1, 1, retries=1)
        waiting = [queue.submit(tasks.add, 2, i) for i in range(2)]
        first.acknowledge(retried)
        first.die()
        second = ScriptedWorker()
        await attached(queue, second)
        assert second.held == [retried]
        second.finish(retried, "again")
        assert second.held == [waiting[0]]
        assert await outcome(retried) == ("again", None)
        second.finish(waiting[0])
        second.finish(waiting[1])


async def test_a_job_whose_delivery_kills_workers_fails_at_the_bound() -> None:
    """A job delivered whole to a worker that died before acknowledging it counts a
    delivery (the worker counts it: ``job.deliveries``); it goes back while it has killed
    fewer than MAX_DELIVERIES workers, then fails with WorkerLostError saying so. A job
    merely queued behind it goes back every time, and runs."""
    async with queue_of(strategy="prefetch", prefetch=2) as queue:
        culprit = queue.submit(tasks.identity, "poison")
        behind = queue.submit(tasks.add, 1, 1)
        for death in range(1, MAX_DELIVERIES + 1):
            worker = ScriptedWorker()
            await attached(queue, worker)
            assert worker.held == [culprit, behind]
            culprit.deliveries += 1  # what a process worker records as it dies unpickling it
            worker.die()
            assert culprit.done() is (death == MAX_DELIVERIES)
        _, error = await outcome(culprit)
        assert isinstance(error, corral.WorkerLostError)
        assert f"killed {MAX_DELIVERIES} workers before it could start" in str(error)
        last = ScriptedWorker()
        await attached(queue, last)
        assert last.held == [behind]
        last.finish(behind, 2)
        assert await outcome(behind) == (2, None)


async def test_a_worker_being_detached_takes_no_new_job_and_stops_once_idle() -> None:
    """detach() stops sending to the worker at once; the worker is asked to stop, and
    stops only after it has finished the job it held; a job submitted meanwhile waits for
    another worker."""
    async with queue_of() as queue:
        leaving, staying = ScriptedWorker(), ScriptedWorker()
        await attached(queue, leaving)
        held = queue.submit(tasks.add, 1, 1)
        leaving.acknowledge(held)
        detaching = asyncio.ensure_future(queue.detach(leaving))
        await waits.until(lambda: leaving.stop_called, BOUND)
        assert queue.workers == []
        later = queue.submit(tasks.add, 2, 2)
        assert leaving.held == [held]  # nothing new for it
        assert not detaching.done()
        leaving.finish(held, 2)
        async with asyncio.timeout(BOUND):
            await detaching
        assert not leaving.alive
        assert await outcome(held) == (2, None)
        await attached(queue, staying)
        assert staying.held == [later]
        staying.finish(later, 4)
        assert await outcome(later) == (4, None)


async def test_broadcasts_are_replayed_on_a_new_worker_in_order_before_it_serves() -> None:
    """A worker attached after two broadcasts runs both, in order, one at a time, before
    any job reaches it, and attach() returns only after them; a broadcast that raised was
    not remembered and is not replayed."""
    async with queue_of(strategy="prefetch", prefetch=4) as queue:
        first = ScriptedWorker()
        await attached(queue, first)
        loads = [asyncio.ensure_future(queue.broadcast(tasks.remember, tag)) for tag in "ab"]
        broken = asyncio.ensure_future(queue.broadcast(tasks.fail, "no"))
        await first.until_received(3)
        for job in first.held[:2]:
            first.finish(job, None)
        first.finish(first.held[0], error=ValueError("no"))
        async with asyncio.timeout(BOUND):
            assert await asyncio.gather(*loads) == [[None], [None]]
            with pytest.raises(ValueError, match="no"):
                await broken
        job = queue.submit(tasks.add, 1, 1)
        first.finish(job, 2)
        second = ScriptedWorker()
        attaching = queue.attach(second)
        replayed = await second.until_received(1)
        pending = queue.submit(tasks.add, 2, 2)
        assert [j.args for j in replayed] == [("a",)]  # one at a time, the first first
        second.finish(replayed[0])
        (_, replayed_b) = await second.until_received(2)
        assert replayed_b.args == ("b",)
        assert first.held == [pending]  # the new worker serves nothing yet
        assert not attaching.done()
        second.finish(replayed_b)
        async with asyncio.timeout(BOUND):
            await attaching
        assert second in queue.workers
        first.finish(pending, 4)
        assert await outcome(pending) == (4, None)


async def test_a_worker_lost_while_replaying_is_not_served_and_attach_says_why() -> None:
    """A worker that dies while replaying a broadcast never serves: attach() raises
    WorkerStartupError, and the jobs waiting stay queued for another worker."""
    async with queue_of() as queue:
        first = ScriptedWorker()
        await attached(queue, first)
        load = asyncio.ensure_future(queue.broadcast(tasks.remember, "a"))
        (replay,) = await first.until_received(1)
        first.finish(replay)
        async with asyncio.timeout(BOUND):
            await load
        await queue.detach(first)
        waiting = queue.submit(tasks.add, 1, 1)
        dying = ScriptedWorker()
        attaching = queue.attach(dying)
        await dying.until_received(1)
        dying.acknowledge(dying.held[0])
        dying.die()
        with pytest.raises(corral.WorkerStartupError):
            async with asyncio.timeout(BOUND):
                await attaching
        assert dying.received[1:] == []
        healthy = ScriptedWorker()
        attaching = queue.attach(healthy)
        (replay,) = await healthy.until_received(1)
        healthy.finish(replay)
        async with asyncio.timeout(BOUND):
            await attaching
        assert healthy.held == [waiting]
        healthy.finish(waiting, 2)


async def test_a_worker_that_fails_to_start_never_serves() -> None:
    """start() raising WorkerStartupError: attach() raises it and the worker gets no job;
    queued jobs wait for a worker that starts."""
    async with queue_of() as queue:
        job = queue.submit(tasks.add, 1, 1)
        broken = ScriptedWorker(fails_to_start=corral.WorkerStartupError(1, "scripted"))
        with pytest.raises(corral.WorkerStartupError, match="scripted"):
            await attached(queue, broken)
        assert broken.received == [] and not job.done()
        worker = ScriptedWorker()
        await attached(queue, worker)
        assert worker.held == [job]
        worker.finish(job, 2)


async def test_fair_sends_one_job_at_a_time_prefetch_up_to_its_count() -> None:
    """Under "fair" a worker holds one job, the next sent only as it finishes; under
    "prefetch" it holds up to ``prefetch``, and each finish tops it up."""
    async with queue_of(strategy="fair") as queue:
        worker = ScriptedWorker()
        await attached(queue, worker)
        jobs = [queue.submit(tasks.add, i, 0) for i in range(3)]
        for i, job in enumerate(jobs):
            assert worker.held == [job]
            worker.finish(job, i)
    async with queue_of(strategy="prefetch", prefetch=2) as queue:
        worker = ScriptedWorker()
        await attached(queue, worker)
        jobs = [queue.submit(tasks.add, i, 0) for i in range(4)]
        assert worker.held == jobs[:2]
        worker.finish(jobs[0])
        assert worker.held == [jobs[1], jobs[2]]
        for job in jobs[1:]:
            worker.finish(job)


async def test_the_queue_keeps_each_workers_figures() -> None:
    """A worker counts nothing: the queue counts the jobs it sent each worker and those
    each finished (a failure and a cancel included), which ``stats()`` shows."""
    async with queue_of(strategy="prefetch", prefetch=2) as queue:
        first, second = ScriptedWorker(), ScriptedWorker()
        await attached(queue, first, second)
        jobs = [queue.submit(tasks.add, i, 0) for i in range(5)]
        assert (first.tasks_sent, second.tasks_sent) == (2, 2)
        first.finish(first.held[0], 0)
        first.finish(first.held[0], error=ValueError("scripted"))
        assert (first.tasks_sent, first.tasks_done) == (3, 2)
        first.held[0].cancel()  # not begun: the worker drops it (job_done, CancelledError)
        for job in list(second.held):
            second.finish(job, 0)
        assert (first.tasks_sent, first.tasks_done) == (3, 3)
        assert (second.tasks_sent, second.tasks_done) == (2, 2)
        assert {w.name: w.tasks_done for w in queue.stats().workers} == {
            first.name: 3,
            second.name: 2,
        }
        errors = [error for _, error in [await outcome(job) for job in jobs]]
        assert sorted(type(error).__name__ for error in errors) == [
            *("CancelledError", "NoneType", "NoneType", "NoneType", "ValueError")
        ]


async def test_lower_priority_first_and_fifo_among_equals() -> None:
    """Jobs waiting for a busy worker go to it lowest priority first, and in the order
    submitted among equal priorities."""
    async with queue_of() as queue:
        worker = ScriptedWorker()
        await attached(queue, worker)
        busy = queue.submit(tasks.add, 0, 0)
        order = [(5, "a"), (0, "b"), (5, "c"), (-1, "d"), (0, "e")]
        jobs = {tag: queue.submit(tasks.identity, tag, priority=p) for p, tag in order}
        worker.finish(busy)
        ran = []
        while worker.held:
            (job,) = worker.held
            ran.append(job.args[0])
            worker.finish(job)
        assert ran == ["d", "b", "e", "a", "c"]
        assert all(job.done() for job in jobs.values())


async def test_series_route_jobs_to_the_workers_that_serve_them() -> None:
    """A job of a series goes only to a worker serving it; a job of no series to any;
    a job of a series no attached worker serves is refused at the call, naming it."""
    async with queue_of() as queue:
        gpu, cpu = ScriptedWorker(series=["gpu"]), ScriptedWorker(series=["cpu"])
        await attached(queue, gpu, cpu)
        on_gpu = queue.submit(tasks.add, 1, 1, series="gpu")
        on_cpu = queue.submit(tasks.add, 2, 2, series="cpu")
        assert (gpu.held, cpu.held) == ([on_gpu], [on_cpu])
        gpu_next = queue.submit(tasks.add, 3, 3, series="gpu")
        cpu.finish(on_cpu)
        assert cpu.held == []  # gpu_next waits for the gpu worker
        anywhere = queue.submit(tasks.add, 4, 4)
        assert cpu.held == [anywhere]
        gpu.finish(on_gpu)
        assert gpu.held == [gpu_next]
        with pytest.raises(ValueError, match="series='tpu'"):
            queue.submit(tasks.add, 5, 5, series="tpu")
        gpu.finish(gpu_next)
        cpu.finish(anywhere)


async def test_cancel_drops_a_pending_job_and_asks_the_worker_for_a_sent_one() -> None:
    """Cancelling a job still queued drops it (no worker hears of it); cancelling a sent
    one calls the worker's cancel, and the job ends CancelledError whether the worker
    drops it (not begun) or ends it later (begun); the slot then serves the next job."""
    async with queue_of(strategy="prefetch", prefetch=2) as queue:
        worker = ScriptedWorker()
        await attached(queue, worker)
        running, ahead, pending, last = (queue.submit(tasks.add, i, i) for i in range(4))
        assert worker.held == [running, ahead]
        worker.acknowledge(running)
        assert pending.cancel()
        assert (await outcome(pending))[1].__class__ is asyncio.CancelledError
        assert ahead.cancel()  # not begun: the worker drops it, the slot takes `last`
        assert [job for job, _ in worker.cancels] == [ahead]
        assert worker.held == [running, last]
        assert running.cancel()
        assert [job for job, _ in worker.cancels] == [ahead, running]
        assert worker.held == [running, last]  # begun: the worker has yet to stop it
        worker.finish(running, error=asyncio.CancelledError())
        for job in (ahead, running):
            assert isinstance((await outcome(job))[1], asyncio.CancelledError)
        assert pending not in worker.received
        worker.finish(last, 6)
        assert await outcome(last) == (6, None)


async def test_a_cancelled_job_on_a_dead_worker_is_not_run_again() -> None:
    """A begun job cancelled while its worker still runs it is not run again when that
    worker dies, retries or not: the next worker gets only the job never cancelled."""
    async with queue_of(strategy="prefetch", prefetch=2) as queue:
        first = ScriptedWorker()
        await attached(queue, first)
        begun, kept = (queue.submit(tasks.add, i, i, retries=1) for i in range(2))
        first.acknowledge(begun)
        begun.cancel()
        first.die()
        second = ScriptedWorker()
        await attached(queue, second)
        assert second.held == [kept]
        second.finish(kept, 4)
        assert isinstance((await outcome(begun))[1], asyncio.CancelledError)
