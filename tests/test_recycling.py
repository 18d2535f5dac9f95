"""Recycling: workers are replaced after a number of jobs, or when they grow too large,
and the job in hand is never lost."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

import corral
from tests import tasks

MB = 1 << 20


@pytest.mark.timeout(90)
@pytest.mark.parametrize("strategy", ["fair", "prefetch"])
async def test_one_task_per_child_gives_a_fresh_process_per_job(strategy: str) -> None:
    """max_tasks_per_child=1 runs every job in a process of its own, under either
    strategy (prefetch never sends a worker more than its quota)."""
    async with corral.Pool(2, max_tasks_per_child=1, strategy=strategy) as pool:  # type: ignore[arg-type]
        pids = await asyncio.gather(*(pool.run(tasks.sleep_then_pid, 0) for _ in range(20)))
    assert len(set(pids)) == 20


@pytest.mark.timeout(90)
async def test_each_worker_runs_at_most_its_quota() -> None:
    """With max_tasks_per_child=3, no process runs more than 3 of 30 jobs, and every job's
    result comes back."""
    async with corral.Pool(2, max_tasks_per_child=3, strategy="prefetch") as pool:
        jobs = [pool.submit(tasks.sleep_then_pid, 0) for _ in range(30)]
        pids = [await job for job in jobs]
    assert max(Counter(pids).values()) <= 3
    assert len(pids) == 30


@pytest.mark.timeout(90)
async def test_a_worker_over_its_memory_limit_is_replaced_after_its_job() -> None:
    """A task that leaks 50 MB pushes its worker over max_memory_per_child: the task's
    result still arrives, and the next call runs in a new process; workers below the
    limit are kept."""
    async with corral.Pool(1) as probe:
        base = await probe.run(tasks.rss)
    async with corral.Pool(1, max_memory_per_child=base + 30 * MB) as pool:
        first = await pool.run(tasks.pid)
        assert await pool.run(tasks.pid) == first  # below the limit: kept
        assert await pool.run(tasks.leak, 50) == first  # the job in hand finishes
        after = await pool.run(tasks.pid)
        assert after != first
        assert await pool.run(tasks.pid) == after


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "2"])
def test_bad_recycling_options_are_refused(bad: object) -> None:
    """Recycling limits must be positive ints; anything else is refused at the call."""
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        corral.Pool(1, max_tasks_per_child=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_memory_per_child"):
        corral.Pool(1, max_memory_per_child=bad)  # type: ignore[arg-type]
