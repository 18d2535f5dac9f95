"""``Pool(cluster=...)`` on a real ``distributed.LocalCluster`` on loopback (two worker
processes of two threads each): a pool of DaskWorkers sharing one client, one per thread of
the cluster unless told, that orders every job itself; its own client closed with it, a
client given left open; options that cannot apply refused at the call; a scheduler out of
reach failing calls with ``WorkerStartupError`` instead of hanging; and the ``Executor``
facade on a cluster."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, LocalCluster

import corral
from corral._mapping import auto_chunksize
from corral.workers import DaskWorker
from tests.test_dask_worker import (
    add,
    address,
    fail_with,
    started_at,
    stuck_until,
)
from tests.waits import bounded

BOUND = 60.0
THREADS = 4  # the module's cluster: 2 worker processes x 2 threads
UNREACHABLE = "tcp://127.0.0.1:1"  # nothing listens on port 1 of loopback


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Two worker processes of two threads each, every one registered with the scheduler
    and having imported the tests' task modules before the first test runs."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0"
        ) as local,
        Client(local) as client,
    ):
        client.wait_for_workers(2, timeout=BOUND)
        client.gather([client.submit(add, i, 1, pure=False) for i in range(8)])
        yield local


def square(x: int) -> int:
    return x * x


def one_client(pool: corral.Pool) -> Any:
    """The one client every worker of pool shares (failing if they do not share one)."""
    clients = {id(w.client): w.client for w in pool.workers if isinstance(w, DaskWorker)}
    assert len(clients) == 1
    return next(iter(clients.values()))


# -- tests ---------------------------------------------------------------------------------


async def test_an_address_gives_one_dask_worker_per_thread(cluster: LocalCluster) -> None:
    """``Pool(cluster=address)`` connects on start, keeps one DaskWorker per thread of the
    cluster, all on one client, and answers 200 calls correctly; leaving ``async with``
    closes the client it made (after its workers stopped)."""
    async with corral.Pool(cluster=cluster.scheduler_address) as pool:
        assert pool.size == THREADS
        assert len(pool.workers) == THREADS
        assert all(isinstance(w, DaskWorker) for w in pool.workers)
        client = one_client(pool)
        jobs = [pool.submit(add, i, 1) for i in range(200)]
        assert await bounded(asyncio.gather(*jobs)) == [i + 1 for i in range(200)]
        assert await bounded(pool.map(square, range(50))) == [x * x for x in range(50)]
    assert client.status == "closed"
    assert not any(w.alive for w in pool.workers)


async def test_a_client_given_is_shared_and_left_open(cluster: LocalCluster) -> None:
    """``Pool(cluster=client)`` with an asynchronous client on this loop: every worker
    uses that very client, and it is still open, and usable, after the pool has closed."""
    async with Client(cluster.scheduler_address, asynchronous=True) as client:
        async with corral.Pool(cluster=client) as pool:
            assert pool.size == THREADS
            assert one_client(pool) is client
            assert await bounded(pool.run(add, 2, 3)) == 5
        assert client.status == "running"
        assert await bounded(client.submit(add, 4, 5, pure=False)) == 9


async def test_workers_sets_how_many_dask_workers(cluster: LocalCluster) -> None:
    """``workers=3`` gives three DaskWorkers, whatever the cluster's threads; a broadcast
    runs once on each."""
    async with corral.Pool(3, cluster=cluster.scheduler_address) as pool:
        assert pool.size == 3
        assert len(pool.workers) == 3
        assert all(isinstance(w, DaskWorker) for w in pool.workers)
        places = await bounded(pool.broadcast(address))
        assert len(places) == 3


async def test_priorities_decide_the_order_on_a_busy_pool(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """On a pool of one DaskWorker (fair: one task on the cluster) kept busy, jobs of random
    priorities wait in corral's queue and then start lowest number first."""
    flag = str(tmp_path / "release")
    async with corral.Pool(1, cluster=cluster.scheduler_address) as pool:
        blocker = pool.submit(stuck_until, flag, True)
        assert await bounded(anext(blocker.reports())) == "running"
        priorities = random.Random(7).sample(range(-50, 50), 20)
        jobs = [pool.submit(started_at, p, priority=p) for p in priorities]
        Path(flag).touch()
        assert await bounded(blocker) == "released"
        results = await bounded(asyncio.gather(*jobs))
        in_start_order = [tag for tag, _ in sorted(results, key=lambda r: r[1])]
        assert in_start_order == sorted(priorities)


async def test_an_exception_keeps_its_type_with_the_remote_traceback(
    cluster: LocalCluster,
) -> None:
    """The task's exception reaches the caller as its own type, with the Dask worker's
    traceback as its cause; the pool serves on."""
    async with corral.Pool(2, cluster=cluster.scheduler_address) as pool:
        with pytest.raises(LookupError, match="no such row") as info:
            await bounded(pool.run(fail_with, "no such row"))
        cause = info.value.__cause__
        assert isinstance(cause, corral.RemoteTraceback)
        assert "fail_with" in cause.tb
        assert await bounded(pool.run(add, 2, 2)) == 4


async def test_resize_adds_and_stops_dask_workers(cluster: LocalCluster) -> None:
    """``resize`` grows the pool by DaskWorkers on the same client and shrinks it again;
    calls are answered at each size."""
    async with corral.Pool(2, cluster=cluster.scheduler_address) as pool:
        client = one_client(pool)
        await bounded(pool.resize(5))
        assert len(pool.workers) == 5
        assert pool.size == 5
        assert one_client(pool) is client
        assert await bounded(pool.map(square, range(20))) == [x * x for x in range(20)]
        await bounded(pool.resize(1))
        assert len(pool.workers) == 1
        assert await bounded(pool.run(add, 1, 1)) == 2


async def test_a_pool_used_without_start_connects_on_its_first_call(
    cluster: LocalCluster,
) -> None:
    """Without ``async with`` the first calls start the pool: they wait in the queue while
    it connects, then all run; the pool's size is the cluster's threads by then."""
    pool = corral.Pool(cluster=cluster.scheduler_address)
    try:
        jobs = [pool.submit(add, i, i) for i in range(20)]
        assert await bounded(asyncio.gather(*jobs)) == [2 * i for i in range(20)]
        assert pool.size == THREADS
    finally:
        await bounded(pool.close())


async def test_stats_and_repr_show_the_dask_kind(cluster: LocalCluster) -> None:
    """``pool.kind`` is "dask", and both the repr and the stats say so."""
    async with corral.Pool(2, cluster=cluster.scheduler_address) as pool:
        await bounded(pool.run(add, 1, 2))
        assert pool.kind == "dask"
        assert "dask workers" in repr(pool)
        stats = pool.stats()
        assert [w.kind for w in stats.workers] == ["dask", "dask"]
        assert stats.calls == 1
        assert "dask" in str(stats)


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("kind", "thread", "kind='thread' does not apply with cluster=: its workers are Dask"),
        ("start_method", "spawn", "start_method='spawn' does not apply with cluster="),
        ("max_memory_per_child", 2**30, "max_memory_per_child=.* does not apply"),
        ("max_tasks_per_child", 10, "max_tasks_per_child=10 does not apply"),
        ("initializer", print, r"initializer=.* pool\.broadcast.* Dask worker plugin"),
        ("initargs", (1,), r"initargs=\(1,\) does not apply.* pool\.broadcast"),
        ("startup_timeout", 0, "startup_timeout must be a positive number"),
        ("workers", 0, "workers must be a positive int"),
    ],
)
def test_options_that_cannot_apply_are_refused_at_the_call(
    option: str, value: Any, match: str
) -> None:
    """Each option of process workers raises ``ValueError`` at ``Pool(...)``, saying why
    and, where there is one, what to use instead."""
    with pytest.raises(ValueError, match=match):
        corral.Pool(cluster="tcp://127.0.0.1:8786", **{option: value})


def test_a_cluster_neither_client_nor_address_is_a_type_error() -> None:
    """A cluster that is neither a client nor an address: ``TypeError`` at ``Pool(...)``."""
    with pytest.raises(TypeError, match=r"distributed\.Client or a scheduler address"):
        corral.Pool(cluster=8786)


def test_a_synchronous_client_is_refused_at_the_call(cluster: LocalCluster) -> None:
    """A synchronous client cannot serve a pool on an event loop: ``ValueError`` at the
    call, naming the two ways that work."""
    with (
        Client(cluster.scheduler_address) as client,
        pytest.raises(ValueError, match=r"asynchronous=True on the event loop.*address"),
    ):
        corral.Pool(cluster=client)


async def test_an_unreachable_scheduler_fails_start_in_bounded_time() -> None:
    """Nothing listens at the address: ``start()`` raises ``WorkerStartupError`` once
    ``startup_timeout`` has passed, the connection error as its cause; later calls are
    refused with the same reason."""
    pool = corral.Pool(cluster=UNREACHABLE, startup_timeout=1)
    began = time.monotonic()
    with pytest.raises(corral.WorkerStartupError, match="could not connect") as info:
        await bounded(pool.start(), 30)
    assert time.monotonic() - began < 5  # not the 60 s connection timeout  # startup_timeout is 1 s
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(corral.WorkerStartupError, match="could not connect"):
        pool.submit(add, 1, 1)


async def test_an_unreachable_scheduler_fails_calls_made_without_start() -> None:
    """Calls submitted to a pool never started wait while it connects, then fail with
    ``WorkerStartupError``; later calls fail with it at once."""
    pool = corral.Pool(cluster=UNREACHABLE, startup_timeout=1)
    try:
        jobs = [pool.submit(add, i, 1) for i in range(3)]
        for job in jobs:
            with pytest.raises(corral.WorkerStartupError, match="could not connect"):
                await bounded(job, 30)
        with pytest.raises(corral.WorkerStartupError, match="could not connect"):
            pool.submit(add, 1, 1)
    finally:
        await bounded(pool.close())


async def test_closing_a_pool_still_connecting_returns_at_once() -> None:
    """A pool whose only call was cancelled while it connected closes without waiting for
    the connection's (long) timeout, and leaves no connection attempt behind."""
    pool = corral.Pool(cluster=UNREACHABLE, startup_timeout=BOUND)
    job = pool.submit(add, 1, 1)
    job.cancel()
    began = time.monotonic()
    await bounded(pool.close(), 10)
    assert time.monotonic() - began < 5  # not the 60 s connection timeout
    with pytest.raises(asyncio.CancelledError):
        await job


async def test_a_start_cancelled_while_connecting_leaves_nothing_open() -> None:
    """``start()`` cancelled (here by ``wait_for``'s bound) while it waits for a scheduler
    that does not answer: the pool is terminated and its half-made client closed (the leak
    check counts its fds)."""
    pool = corral.Pool(cluster=UNREACHABLE, startup_timeout=BOUND)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pool.start(), 0.5)
    assert pool.closed
    with pytest.raises(corral.PoolClosedError):
        pool.submit(add, 1, 1)


def test_an_executor_runs_calls_on_the_cluster(cluster: LocalCluster) -> None:
    """``corral.Executor(cluster=address)`` runs calls, one by one and mapped, on the
    cluster, and its shutdown closes the pool's client."""
    with corral.Executor(cluster=cluster.scheduler_address) as executor:
        assert executor.submit(add, 20, 22).result(timeout=BOUND) == 42
        assert list(executor.map(add, range(5), range(5), timeout=BOUND)) == [0, 2, 4, 6, 8]


async def test_an_executor_given_a_client_says_to_pass_the_address(
    cluster: LocalCluster,
) -> None:
    """An Executor runs its pool on an event loop of its own, where a client of this loop
    cannot serve: ``Executor(cluster=client)`` raises at once, saying to pass the address,
    and leaves the client alone."""
    async with Client(cluster.scheduler_address, asynchronous=True) as client:
        with pytest.raises(ValueError, match="takes the scheduler's address"):
            corral.Executor(cluster=client)
        assert client.status == "running"


async def test_a_map_that_starts_the_pool_chunks_for_every_thread(cluster: LocalCluster) -> None:
    """A pool started by its first call learns its size on connecting; ``map`` waits for
    that before it cuts its input, so the chunks are sized for all the cluster's threads,
    not for the one worker a pool not yet connected would count."""
    pool = corral.Pool(cluster=cluster.scheduler_address)
    try:
        items = list(range(320))
        assert await bounded(pool.map(square, items)) == [x * x for x in items]
        assert pool.size == THREADS
        jobs = -(-len(items) // auto_chunksize(len(items), THREADS))
        assert pool.stats().calls == jobs > -(-len(items) // auto_chunksize(len(items), 1))
    finally:
        await bounded(pool.close())


async def test_a_start_waiting_on_a_connection_that_close_gives_up_is_told_why() -> None:
    """``close()`` gives up a connection no call needs; a ``start()`` waiting for it gets
    ``PoolClosedError``, not a ``CancelledError`` its task never asked for."""
    pool = corral.Pool(cluster=UNREACHABLE, startup_timeout=BOUND)
    starting = asyncio.ensure_future(pool.start())
    await asyncio.sleep(0)  # start() runs up to its wait for the connection
    await bounded(pool.close(), 10)
    with pytest.raises(corral.PoolClosedError):
        await bounded(starting)


async def test_close_stops_connecting_once_its_last_call_is_cancelled() -> None:
    """A call waits for the connection as ``close()`` begins, then is cancelled: close
    returns at once instead of waiting out the connection's timeout."""
    pool = corral.Pool(cluster=UNREACHABLE, startup_timeout=BOUND)
    job = pool.submit(add, 1, 1)
    closing = asyncio.ensure_future(pool.close())
    await asyncio.sleep(0)  # close() waits for the call
    assert not closing.done()
    job.cancel()
    began = time.monotonic()
    await bounded(closing, 10)
    assert time.monotonic() - began < 10


async def test_a_cluster_with_no_worker_yet_is_waited_for() -> None:
    """A pool sized by a cluster that has no worker yet waits (within its startup timeout)
    for the first one to join and sizes itself by it; a cluster that never gets one fails
    start with ``WorkerStartupError`` saying so."""
    async with LocalCluster(
        n_workers=0, threads_per_worker=2, processes=True, dashboard_address=":0", asynchronous=True
    ) as empty:
        with pytest.raises(corral.WorkerStartupError, match="had no worker"):
            await bounded(corral.Pool(cluster=empty.scheduler_address, startup_timeout=1).start())
        pool = corral.Pool(cluster=empty.scheduler_address, startup_timeout=BOUND)
        starting = asyncio.ensure_future(pool.start())
        try:
            empty.scale(1)
            await bounded(starting)
            assert pool.size == 2
            assert await bounded(pool.run(square, 3)) == 9
        finally:
            await bounded(pool.close())
