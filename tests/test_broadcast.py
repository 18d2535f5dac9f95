"""``broadcast``: one call on every worker, replayed on every worker that starts later, so
state set this way survives recycling, crashes, resizing and attaching."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

import corral
from corral.workers import ThreadWorker
from tests import tasks
from tests.waits import bounded, until


async def test_broadcast_runs_once_on_every_worker() -> None:
    async with corral.Pool(3) as pool:
        pids = await bounded(pool.broadcast(tasks.set_state, "model", "small"))
        assert sorted(pids) == sorted(w.pid for w in pool.workers)
        seen = await bounded(pool.map(tasks.get_state, ["model"] * 60, chunksize=1))
        assert {value for _, value in seen} == {"small"}


async def test_broadcast_state_survives_20_recyclings() -> None:
    """With a worker recycled after every 2 jobs, each of 20+ fresh processes has the
    broadcast state before it takes a job."""
    async with corral.Pool(2, max_tasks_per_child=2) as pool:
        await bounded(pool.broadcast(tasks.set_state, "model", "large"))
        seen = [await bounded(pool.run(tasks.get_state, "model")) for _ in range(44)]
        assert {value for _, value in seen} == {"large"}
        assert len({pid for pid, _ in seen}) >= 20


async def test_broadcast_replayed_after_a_crash_and_a_resize() -> None:
    async with corral.Pool(1) as pool:
        await bounded(pool.broadcast(tasks.set_state, "k", 1))
        await bounded(pool.broadcast(tasks.set_state, "k", 2))  # replayed in order
        (victim,) = pool.workers
        with pytest.raises(corral.WorkerLostError):
            await bounded(pool.run(tasks.kill_self, signal.SIGKILL))
        await bounded(pool.resize(3))
        seen = await bounded(pool.map(tasks.get_state, ["k"] * 30, chunksize=1))
        assert {value for _, value in seen} == {2}
        assert victim.pid not in {pid for pid, _ in seen}


async def test_broadcast_that_raises_is_not_remembered() -> None:
    async with corral.Pool(2) as pool:
        with pytest.raises(ValueError, match="nope"):
            await bounded(pool.broadcast(tasks.fail, "nope"))
        await bounded(pool.resize(3))  # the new worker replays nothing that fails
        assert len(pool.workers) == 3
        assert await bounded(pool.run(tasks.add, 1, 1)) == 2


async def test_broadcast_waits_for_busy_workers_and_goes_first() -> None:
    """A broadcast to a busy worker runs when its job ends, ahead of jobs queued before
    the broadcast."""
    async with corral.TaskQueue() as queue:
        await bounded(queue.attach(ThreadWorker()))
        done: list[str] = []
        busy = queue.submit(tasks.sleep, 0.05)
        queued = queue.submit(tasks.identity, "queued")
        queued.add_done_callback(lambda _: done.append("queued"))
        result = await bounded(queue.broadcast(done.append, "broadcast"))
        assert result == [None]
        await bounded(asyncio.gather(busy, queued))
        # The job's own done-callback may still be due: since 3.12 a gather of futures
        # already done completes at once, before their scheduled callbacks have run.
        await until(lambda: len(done) == 2)
        assert done == ["broadcast", "queued"]


async def test_broadcast_on_a_queue_replays_on_attach() -> None:
    async with corral.TaskQueue() as queue:
        assert await queue.broadcast(tasks.set_state, "q", "v") == []  # no worker yet
        worker = ThreadWorker()
        await bounded(queue.attach(worker))
        assert await bounded(queue.run(tasks.get_state, "q")) == (os.getpid(), "v")


async def test_replay_that_fails_on_a_new_worker_breaks_the_pool_clearly() -> None:
    """State that can no longer be set up (the call raises on new workers) stops the pool
    with WorkerStartupError naming the broadcast, as a raising initializer would."""
    async with corral.Pool(1, kind="thread", max_tasks_per_child=1) as pool:
        await bounded(pool.broadcast(tasks.fail_after_first, f"tag-{id(pool)}"))
        await bounded(pool.run(tasks.identity, 1))  # recycles: the replay then fails
        with pytest.raises(corral.WorkerStartupError, match="replaying broadcast fail_after_first"):
            await bounded(pool.run(tasks.identity, 2))


async def test_broadcast_of_an_unpicklable_call_fails_at_the_call() -> None:
    async with corral.Pool(1) as pool:
        import threading

        with pytest.raises(corral.SerializationError):
            await pool.broadcast(tasks.identity, threading.Lock())
        assert await bounded(pool.run(tasks.add, 2, 2)) == 4
