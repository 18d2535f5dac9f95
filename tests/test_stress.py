"""The failure that hurt Celery 3.1's prefork pool for years, staged on purpose: workers
recycled after every job while new ones start slowly and others are killed at random.
Celery kept its pipes in tables keyed by fd numbers, which the OS reuses; corral keys
everything by worker objects, so this must lose nothing, run nothing twice and leak nothing.

A worker may die in any state at any moment: starting (before or after it announced
itself), serving, retiring. The victims are drawn from the serving workers, or from every
worker the pool has, starting ones included, so kills land in a worker's first
milliseconds too. ``benchmarks/soak.py`` runs the same chaos longer, many times over.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

import corral
from tests import tasks

JOBS = 1500


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _victims(pool: corral.Pool, starting_too: bool) -> list[int]:
    """The pids a chaos monkey may kill: the serving workers', or every worker's."""
    if starting_too:
        return [w.pid for w in pool.stats().workers if w.pid is not None]
    return [w.pid for w in pool.workers if w.pid is not None]


@pytest.mark.loops("asyncio")  # 20-45 s each on 2 cores: one loop is enough in CI
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("starting_too", "pause", "seed"),
    [(False, (0.002, 0.008), 31), (True, (0.001, 0.006), 47)],
    ids=["serving-workers", "starting-workers-too"],
)
async def test_recycling_slow_starts_and_random_kills_lose_nothing(
    tmp_path: Path, starting_too: bool, pause: tuple[float, float], seed: int
) -> None:
    """8 workers, max_tasks_per_child=1, an initializer sleeping 0-50 ms, a random worker
    (serving, or in any state) SIGKILLed every few ms, 1,500 jobs: each job completes
    exactly once or fails with WorkerLostError (never twice, never hanging, never another
    error), and the parent's fd and child counts come back to where they started."""
    ledger = str(tmp_path / "ledger")
    fds_before = _open_fds()
    children_before = {p.pid for p in psutil.Process().children()}
    rng = random.Random(seed)
    killed = 0
    started = time.monotonic()
    async with corral.Pool(
        8, max_tasks_per_child=1, initializer=tasks.nap_randomly, initargs=(0.05,)
    ) as pool:
        jobs = [pool.submit(tasks.record, ledger, i) for i in range(JOBS)]
        everything = asyncio.gather(*(job.future for job in jobs), return_exceptions=True)
        while not everything.done():
            live = _victims(pool, starting_too)
            if live:
                try:
                    os.kill(rng.choice(live), signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            await asyncio.wait({everything}, timeout=rng.uniform(*pause))
        outcomes = await everything
    elapsed = time.monotonic() - started

    done = {i for i, outcome in enumerate(outcomes) if outcome == i}
    lost = {i for i, outcome in enumerate(outcomes) if isinstance(outcome, corral.WorkerLostError)}
    others = [o for o in outcomes if o not in done and not isinstance(o, corral.WorkerLostError)]
    assert not others, f"jobs ended otherwise: {others[:3]}"
    assert done | lost == set(range(JOBS)), "every job completed or failed with WorkerLostError"
    runs = Counter(int(line) for line in Path(ledger).read_text().split())
    assert all(runs[i] == 1 for i in done), "a completed job ran exactly once"
    assert all(runs[i] <= 1 for i in lost), "a lost job never ran twice"
    assert killed > 50, f"the test killed only {killed} workers in {elapsed:.1f} s"

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = {p.pid for p in psutil.Process().children()} - children_before
        if not children and _open_fds() <= fds_before:
            break
        await asyncio.sleep(0.05)
    assert not children, f"children left: {children}"
    assert _open_fds() <= fds_before
