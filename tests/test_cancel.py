"""Cancellation: a pending job never runs; a running one is interrupted inside its worker,
which is killed and replaced only if the job will not stop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import corral
from tests import tasks


async def _until(predicate: object, bound: float = 20.0) -> None:
    deadline = time.monotonic() + bound
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "gave up waiting"
        await asyncio.sleep(0.01)


async def _running(pool: corral.Pool, job: corral.Job[object]) -> None:
    """Wait until job has started in its worker (its acknowledgement is in shared memory)."""
    (worker,) = pool.workers
    await _until(lambda: worker._page is not None and worker._page.started == job.id)


@pytest.mark.timeout(60)
async def test_a_running_job_is_interrupted_and_may_clean_up(tmp_path: Path) -> None:
    """Cancelling a running job raises CancelledError inside it; its clean-up runs, and
    the worker, which stopped in time, is kept."""
    marker = tmp_path / "marker"
    async with corral.Pool(1) as pool:
        before = await pool.run(tasks.pid)
        job = pool.submit(tasks.sleep_and_clean_up, str(marker), 1000)
        await _running(pool, job)
        assert job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        await _until(lambda: marker.exists() and marker.read_text() == "cleaned")
        assert await pool.run(tasks.pid) == before


@pytest.mark.timeout(60)
async def test_a_job_that_ignores_its_interrupt_costs_its_worker(tmp_path: Path) -> None:
    """A running job with signals blocked cannot be interrupted: after the grace period its
    worker is killed and replaced, and the pool keeps serving."""
    async with corral.Pool(1) as pool:
        before = await pool.run(tasks.pid)
        job = pool.submit(tasks.sleep_with_signals_blocked, 1000)
        await _running(pool, job)
        job.cancel()
        after = await asyncio.wait_for(pool.run(tasks.pid), 30)
        assert after != before
        assert [await pool.run(tasks.add, i, i) for i in range(10)] == [2 * i for i in range(10)]


@pytest.mark.timeout(60)
async def test_a_job_waiting_in_the_pipe_never_runs(tmp_path: Path) -> None:
    """Under prefetch a job may already sit in its worker's pipe: cancelled there, it is
    skipped (its side effect never happens) and the worker is not harmed."""
    gate = tmp_path / "gate"
    ledger = tmp_path / "ledger"
    async with corral.Pool(1, strategy="prefetch", prefetch=4) as pool:
        blocker = pool.submit(tasks.wait_for_file, str(gate), 30)
        victim = pool.submit(tasks.record, str(ledger), 7)
        after = pool.submit(tasks.record, str(ledger), 8)
        await _running(pool, blocker)
        assert victim.cancel()
        gate.touch()
        pid = await blocker
        assert await after == 8
        assert ledger.read_text() == "8\n"
        assert await pool.run(tasks.pid) == pid


@pytest.mark.timeout(60)
async def test_cancelling_the_awaiting_task_interrupts_the_job(tmp_path: Path) -> None:
    """Cancelling the asyncio task that awaits pool.run interrupts the job in its worker."""
    marker = tmp_path / "marker"
    async with corral.Pool(1) as pool:
        waiter = asyncio.ensure_future(pool.run(tasks.sleep_and_clean_up, str(marker), 1000))
        (worker,) = pool.workers
        await _until(lambda: worker._page is not None and worker._page.started != 0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await _until(lambda: marker.exists() and marker.read_text() == "cleaned")
        assert await pool.run(tasks.add, 1, 1) == 2


@pytest.mark.timeout(60)
async def test_a_cancelled_map_stops_all_its_jobs(tmp_path: Path) -> None:
    """Cancelling a map stops every one of its jobs: none is left running, and the pool
    is free for the next call at once."""
    async with corral.Pool(2) as pool:
        mapping = asyncio.ensure_future(pool.map(tasks.sleep, [1000] * 6, chunksize=1))
        await _until(lambda: len(pool._in_flight) == 2)
        mapping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await mapping
        assert await asyncio.wait_for(pool.run(tasks.add, 2, 3), 10) == 5
        await _until(lambda: not pool._in_flight)
