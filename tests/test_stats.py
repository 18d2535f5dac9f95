"""``stats()``: each worker's kind, pid, state, tasks, busy and idle time and memory, the
queue's length and the timing percentiles, and the table it prints as."""

from __future__ import annotations

import asyncio
import os

import pytest

import corral
from corral._stats import Percentiles
from tests import tasks
from tests.waits import bounded


@pytest.mark.parametrize("kind", ["process", "thread", "local"])
async def test_busy_time_matches_the_tasks_sleep(kind: str) -> None:
    """Two workers run 10 calls sleeping 0.1 s: their busy times add up to 1 s within 10%,
    run-time percentiles say 0.1 s, and every field is plausible."""
    # A local worker runs in the loop: its calls must await, or each blocks the others.
    sleep = tasks.async_sleep if kind == "local" else tasks.sleep
    async with corral.Pool(2, kind=kind) as pool:  # type: ignore[arg-type]
        await bounded(pool.map(sleep, [0.1] * 10, chunksize=1))
        stats = pool.stats()
    assert len(stats.workers) == 2
    assert sum(w.busy for w in stats.workers) == pytest.approx(1.0, rel=0.1)
    assert sum(w.tasks_done for w in stats.workers) == 10
    for w in stats.workers:
        assert w.kind == kind
        assert w.state == "idle"
        assert w.in_flight == 0
        assert w.idle >= 0
        if kind == "process":
            assert w.pid is not None and w.pid != os.getpid()
            assert w.rss is not None and w.rss > 1_000_000
        else:
            assert w.pid is None and w.rss is None
    assert stats.calls == 10
    assert stats.failed == 0
    assert stats.queued == 0
    assert stats.in_flight == 0
    assert stats.run.count == 10
    assert stats.run.p50 == pytest.approx(0.1, rel=0.1)
    assert 0 <= stats.transfer.p50 < 0.1
    assert stats.wait.max < 1.0
    assert stats.rss > 1_000_000


async def test_stats_while_busy_and_queued() -> None:
    async with corral.Pool(1, kind="thread") as pool:
        jobs = [pool.submit(tasks.sleep, 0.2) for _ in range(3)]
        stats = pool.stats()  # submit hands the first job over at once; two wait
        assert stats.queued == 2
        assert stats.in_flight == 1
        assert [w.state for w in stats.workers] == ["busy"]
        await bounded(asyncio.gather(*jobs))
        stats = pool.stats()
        assert stats.wait.max == pytest.approx(0.4, rel=0.25)


async def test_failures_are_counted() -> None:
    async with corral.Pool(1, kind="local") as pool:
        with pytest.raises(ValueError):
            await pool.run(tasks.fail, "x")
        await pool.run(tasks.add, 1, 1)
        stats = pool.stats()
    assert (stats.calls, stats.failed) == (2, 1)


async def test_stats_print_as_a_table() -> None:
    async with corral.Pool(2) as pool:
        await bounded(pool.map(tasks.square, range(20), chunksize=1))
        text = str(pool.stats())
    lines = text.splitlines()
    assert lines[0].startswith("2 workers, 0 queued, 0 in flight, 20 calls (0 failed)")
    assert lines[2].split() == [
        "worker",
        "kind",
        "pid",
        "state",
        "done",
        "busy",
        "s",
        "idle",
        "s",
        "rss",
        "MiB",
    ]
    assert sum(1 for line in lines if " process " in line) == 2
    for name in ("queue wait", "transfer", "run"):
        assert any(line.startswith(name) for line in lines)


def test_percentiles() -> None:
    p = Percentiles.of(float(i) for i in range(1, 101))
    assert (p.count, p.p50, p.p90, p.p99, p.max) == (100, 51.0, 91.0, 100.0, 100.0)
    assert Percentiles.of([]) == Percentiles(0, 0.0, 0.0, 0.0, 0.0)
