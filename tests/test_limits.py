"""Time limits: the soft one raises inside the task, the hard one kills the worker."""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest

import corral
from tests import tasks

# Bounds for "soon after the limit": generous, since CI machines are slow and noisy.
SLACK = 5.0


@pytest.mark.timeout(60)
async def test_hard_limit_kills_a_sleeping_task_and_the_pool_goes_on() -> None:
    """A task in time.sleep(1000) under a 0.5 s hard limit fails with TimeLimitExceeded
    soon after the limit; its process is gone and the pool serves calls on a new one."""
    async with corral.Pool(1) as pool:
        (old,) = [w.pid for w in pool.workers]
        started = time.monotonic()
        with pytest.raises(corral.TimeLimitExceeded) as caught:
            await pool.run(tasks.sleep, 1000, time_limit=0.5)
        assert 0.5 <= time.monotonic() - started < 0.5 + SLACK
        assert caught.value.limit == 0.5
        assert [await pool.run(tasks.add, i, 1) for i in range(20)] == list(range(1, 21))
        assert await pool.run(tasks.pid) != old
    assert old is not None and not psutil.pid_exists(old)


@pytest.mark.timeout(60)
async def test_hard_limit_stops_a_task_that_blocks_signals() -> None:
    """A task that blocks every signal it can still cannot outlive its hard limit."""
    async with corral.Pool(1) as pool:
        with pytest.raises(corral.TimeLimitExceeded):
            await pool.run(tasks.sleep_with_signals_blocked, 1000, time_limit=0.3)
        assert await pool.run(tasks.add, 2, 2) == 4


@pytest.mark.timeout(60)
async def test_hard_limit_counts_from_the_start_not_the_submission() -> None:
    """A job that waits behind a busy worker longer than its limit still gets its whole
    limit once it starts."""
    async with corral.Pool(1) as pool:
        first = pool.submit(tasks.sleep, 0.6)
        second = pool.submit(tasks.sleep, 0.2, time_limit=0.5)
        assert await first == 0.6
        assert await second == 0.2


@pytest.mark.timeout(60)
async def test_pool_default_limit_and_a_call_overriding_it() -> None:
    """The pool's time_limit applies to calls that set none; a call's own limit wins."""
    async with corral.Pool(1, time_limit=0.3) as pool:
        with pytest.raises(corral.TimeLimitExceeded):
            await pool.run(tasks.sleep, 1000)
        assert await pool.run(tasks.sleep, 0.5, time_limit=5) == 0.5


@pytest.mark.timeout(60)
async def test_jobs_queued_behind_a_killed_job_run_exactly_once() -> None:
    """Under prefetch, jobs sent to the worker behind one that hits its hard limit are not
    lost: they run, each once, on the replacement."""
    async with corral.Pool(1, strategy="prefetch", prefetch=4) as pool:
        stuck = pool.submit(tasks.sleep, 1000, time_limit=0.3)
        behind = [pool.submit(tasks.sleep_then_pid, 0) for _ in range(3)]
        with pytest.raises(corral.TimeLimitExceeded):
            await stuck
        pids = [await job for job in behind]
        assert len(set(pids)) == 1
        assert pids[0] == await pool.run(tasks.pid)


@pytest.mark.timeout(60)
async def test_soft_limit_is_raised_inside_the_task_which_may_clean_up() -> None:
    """Past the soft limit the task gets SoftTimeLimitExceeded and may catch it; the worker
    lives on."""
    async with corral.Pool(1) as pool:
        before = await pool.run(tasks.pid)
        result = await pool.run(tasks.sleep_catching_soft_limit, 1000, soft_time_limit=0.2)
        assert result == "cleaned up after 0.2"
        assert await pool.run(tasks.pid) == before


@pytest.mark.timeout(60)
async def test_uncaught_soft_limit_reaches_the_caller_with_the_worker_traceback() -> None:
    """A task that does not catch its soft limit fails with SoftTimeLimitExceeded, the
    worker's traceback attached, and the worker survives."""
    async with corral.Pool(1, soft_time_limit=0.2) as pool:
        before = await pool.run(tasks.pid)
        with pytest.raises(corral.SoftTimeLimitExceeded) as caught:
            await pool.run(tasks.sleep, 1000)
        assert isinstance(caught.value.__cause__, corral.RemoteTraceback)
        assert "time.sleep" in caught.value.__cause__.tb
        assert await pool.run(tasks.pid) == before


@pytest.mark.timeout(60)
async def test_soft_limit_is_disarmed_when_the_task_ends() -> None:
    """A fast call's soft limit does not go off in the next call on the same worker."""
    async with corral.Pool(1) as pool:
        assert await pool.run(tasks.add, 1, 1, soft_time_limit=0.2) == 2
        assert await pool.run(tasks.sleep, 0.5) == 0.5


@pytest.mark.parametrize("bad", [0, -1, "1", True, float("nan")])
async def test_bad_limits_are_refused_at_the_call(bad: object) -> None:
    """A limit that is not a positive number of seconds is refused where it is given."""
    with pytest.raises(ValueError, match="time_limit"):
        corral.Pool(1, time_limit=bad)  # type: ignore[arg-type]
    async with corral.Pool(1) as pool:
        with pytest.raises(ValueError, match="soft_time_limit"):
            pool.submit(tasks.add, 1, 2, soft_time_limit=bad)  # type: ignore[arg-type]
        assert await pool.run(tasks.add, 1, 2) == 3


async def test_limits_wait_for_nothing_when_unused() -> None:
    """Calls without limits leave no timer behind (the queue's deadline table is empty)."""
    async with corral.Pool(1, strategy="prefetch") as pool:
        await asyncio.gather(*(pool.run(tasks.add, i, i) for i in range(50)))
        assert not pool._deadlines
