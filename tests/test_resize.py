"""``Pool.resize``: growing and shrinking live, during a map, losing nothing; and what
``detach`` and ``attach`` do to a pool's size."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import corral
from corral.workers import ThreadWorker
from tests import tasks
from tests.waits import bounded, until


@pytest.mark.parametrize("kind", ["process", "thread"])
async def test_resize_up_and_down_during_a_map_loses_nothing(kind: str) -> None:
    """A map of 2,000 jobs (one job each) while the pool grows 2 -> 5 and shrinks to 1:
    every result is there, in order, and the pool ends at its new size."""
    async with corral.Pool(2, kind=kind) as pool:  # type: ignore[arg-type]
        mapping = asyncio.ensure_future(pool.map(tasks.sleep, [0.001] * 2000, chunksize=1))
        await until(lambda: pool.stats().calls >= 100)  # the map is under way
        await bounded(pool.resize(5))
        assert len(pool.workers) == 5
        await until(lambda: pool.stats().calls >= 600)
        assert not mapping.done()
        await bounded(pool.resize(1))
        assert len(pool.workers) == 1
        assert pool.size == 1
        assert await bounded(mapping) == [0.001] * 2000
        stats = pool.stats()
        assert stats.calls == 2000
        assert stats.failed == 0


async def test_shrink_takes_idle_workers_first() -> None:
    async with corral.Pool(3, kind="thread") as pool:
        busy = pool.submit(tasks.sleep, 0.5)
        await asyncio.sleep(0)
        holder = next(w for w in pool.workers if w.tasks_sent)
        await bounded(pool.resize(1))
        assert pool.workers == [holder]
        assert await bounded(busy) == 0.5


async def test_resize_before_start_sets_the_size() -> None:
    pool = corral.Pool(1, kind="thread")
    try:
        await bounded(pool.resize(3))
        assert len(pool.workers) == 3
    finally:
        await pool.close()


async def test_resize_checks_its_argument_and_state() -> None:
    async with corral.Pool(1, kind="thread") as pool:
        for bad in (0, -1, 1.5, True, None):
            with pytest.raises(ValueError, match="positive int"):
                await pool.resize(bad)  # type: ignore[arg-type]
    with pytest.raises(corral.PoolClosedError):
        await pool.resize(2)


async def test_detaching_a_pool_worker_shrinks_the_pool() -> None:
    async with corral.Pool(2, kind="thread") as pool:
        await bounded(pool.detach(pool.workers[0]))
        assert pool.size == 1
        assert len(pool.workers) == 1
        assert await bounded(pool.run(tasks.add, 1, 2)) == 3


async def test_an_attached_worker_serves_but_is_not_kept_alive() -> None:
    """A worker attached to a pool serves its calls; the pool does not replace it when it
    goes, and the pool's own size is unchanged."""
    async with corral.Pool(1) as pool:
        extra = ThreadWorker(series=["io"])
        await bounded(pool.attach(extra))
        assert len(pool.workers) == 2
        assert await bounded(pool.run(tasks.identity, "x", series="io")) == "x"
        await bounded(pool.detach(extra))
        assert pool.size == 1
        assert len(pool.workers) == 1


async def test_a_pool_with_every_worker_detached_waits_then_fails_on_close(
    tmp_path: Path,
) -> None:
    """The pool's last worker detached while a call waits behind the one it runs: the
    waiting call stays queued (a resize serves it), and a call still waiting when the
    pool closes with no worker fails with ``PoolClosedError`` instead of waiting forever."""
    pool = corral.Pool(1, kind="thread")
    await bounded(pool.start())
    gate = tmp_path / "gate"
    running = pool.submit(tasks.wait_for_file, str(gate), 60)
    queued = pool.submit(tasks.add, 1, 2)
    detaching = asyncio.ensure_future(pool.detach(pool.workers[0]))
    await until(lambda: pool.size == 0)
    gate.touch()
    await bounded(detaching)
    assert await bounded(running) > 0
    assert not queued.done()
    await bounded(pool.resize(1))
    assert await bounded(queued) == 3
    await bounded(pool.detach(pool.workers[0]))
    waiting = pool.submit(tasks.add, 2, 2)
    await bounded(pool.close())
    with pytest.raises(corral.PoolClosedError, match="no worker left"):
        await bounded(waiting)
