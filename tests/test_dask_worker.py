"""``DaskWorker`` on a real ``distributed.LocalCluster`` on loopback (two worker processes of
one thread each, one of which declares the resource ``gpu``): calls, priorities, series,
errors, a Dask worker killed mid-task, streams with bounded memory, reports, time limits
and cancellation, and the error a missing Dask gives."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import dask
import psutil
import pytest
from distributed import Client, LocalCluster, get_worker

import corral
from corral.workers import DaskWorker
from tests.waits import bounded, wait_until

BOUND = 60.0
GPU = "gpu"


# -- run in the Dask workers (importable, so pickled by reference) -------------------------


def add(a: int, b: int) -> int:
    return a + b


def make_lock() -> Any:
    return threading.Lock()


def address() -> str:
    """The Dask worker running this task."""
    return str(get_worker().address)


def started_at(tag: int) -> tuple[int, int]:
    """When (monotonic clock, one per machine) this call started."""
    return tag, time.monotonic_ns()


def span(seconds: float) -> tuple[float, float]:
    """(start, end) of a call that sleeps seconds."""
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic()


def announce_then_sleep(seconds: float) -> str:
    """Report that it runs, then hold the Dask worker's thread for seconds."""
    corral.report("running")
    time.sleep(seconds)
    return "slept"


def fail_with(message: str) -> None:
    raise LookupError(message)


def report_each(n: int) -> str:
    for i in range(n):
        corral.report({"step": i})
    return "finished"


def stuck_until(flag: str, announce: bool = False) -> str:
    """Stuck, from Dask's point of view, until the file flag exists (BOUND s at most)."""
    if announce:
        corral.report("running")
    deadline = time.monotonic() + BOUND
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.02)
    return "released"


def catch_soft_limit() -> str:
    deadline = time.monotonic() + BOUND
    try:
        while time.monotonic() < deadline:
            time.sleep(0.001)
    except corral.SoftTimeLimitExceeded as exc:
        return f"caught: {exc}"
    return "no soft limit came"


def kill_own_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_once(marker: str) -> int:
    """Kill this Dask worker's process the first time; return its pid the second."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def chunks(n: int, size: int) -> Iterator[bytes]:
    for i in range(n):
        yield i.to_bytes(8, "little") * (size // 8)


def endless_with_finally(flag: str) -> Iterator[int]:
    try:
        i = 0
        while True:
            yield i
            i += 1
    finally:
        Path(flag).touch()


async def declare_gpu(dask_worker: Any) -> None:
    await dask_worker.set_resources(gpu=1)


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Two single-thread worker processes; the first declares the resource ``gpu``."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as local,
        Client(local) as client,
    ):
        gpu = sorted(client.scheduler_info()["workers"])[0]
        client.run(declare_gpu, workers=[gpu])
        wait_until(lambda: client.run_on_scheduler(_gpu_workers) == [gpu])
        # The workers import this module (for the tasks) before the first test runs.
        client.gather([client.submit(add, i, 1, pure=False) for i in range(8)])
        yield local


def _gpu_workers(dask_scheduler: Any) -> list[str]:
    return sorted(a for a, ws in dask_scheduler.workers.items() if ws.resources.get(GPU))


def _workers(dask_scheduler: Any) -> list[str]:
    return sorted(dask_scheduler.workers)


def _task_keys(dask_scheduler: Any) -> list[str]:
    return [str(key) for key in dask_scheduler.tasks]


def connect(cluster: LocalCluster) -> Client:
    """An asynchronous client of the cluster, on this test's loop."""
    return Client(cluster.scheduler_address, asynchronous=True)


@contextlib.asynccontextmanager
async def serving(
    cluster: LocalCluster, **options: Any
) -> AsyncIterator[tuple[corral.TaskQueue, Client]]:
    """A queue (made with options) served by one DaskWorker of a client on this loop."""
    async with connect(cluster) as client, corral.TaskQueue(**options) as queue:
        await bounded(queue.attach(DaskWorker(client)))
        yield queue, client


async def gpu_address(client: Client) -> str:
    (gpu,) = await client.run_on_scheduler(_gpu_workers)
    return str(gpu)


# -- tests ---------------------------------------------------------------------------------


async def test_a_thousand_calls_return_their_results(cluster: LocalCluster) -> None:
    """1,000 calls, many in flight on the cluster at once, each give their own result,
    with the time spent inside the call measured in the Dask worker."""
    async with serving(cluster, strategy="prefetch", prefetch=64) as (queue, _):
        jobs = [queue.submit(add, i, 1) for i in range(1000)]
        assert await bounded(asyncio.gather(*jobs)) == [i + 1 for i in range(1000)]
        assert all(job.run_time is not None and 0 <= job.run_time < 1 for job in jobs)


@pytest.mark.parametrize("strategy", ["fair", "prefetch"])
async def test_priorities_decide_the_order_on_a_busy_worker(
    cluster: LocalCluster, strategy: str
) -> None:
    """While the gpu worker's only thread is busy, jobs of random priorities pile up; they
    then run lowest number first. Under "fair" corral's queue holds them; under
    "prefetch" they are all on the cluster, and Dask's priorities order them."""
    async with serving(cluster, strategy=strategy, prefetch=100) as (queue, _):
        blocker = queue.submit(announce_then_sleep, 1.5, series=GPU)
        reports = blocker.reports()
        assert await bounded(anext(reports)) == "running"
        priorities = random.Random(7).sample(range(-50, 50), 20)
        jobs = [queue.submit(started_at, p, priority=p, series=GPU) for p in priorities]
        results = await bounded(asyncio.gather(*jobs))
        assert await bounded(blocker) == "slept"
        in_start_order = [tag for tag, _ in sorted(results, key=lambda r: r[1])]
        assert in_start_order == sorted(priorities)


async def test_jobs_of_a_series_run_only_where_its_resource_is(cluster: LocalCluster) -> None:
    """A job's series is a Dask resource: jobs of series gpu all run on the one Dask worker
    that declares it, while jobs of no series may run on either."""
    async with serving(cluster, strategy="prefetch", prefetch=16) as (queue, client):
        gpu = await gpu_address(client)
        places = await bounded(asyncio.gather(*(queue.run(address, series=GPU) for _ in range(20))))
        assert set(places) == {gpu}
        anywhere = await bounded(asyncio.gather(*(queue.run(address) for _ in range(20))))
        assert set(anywhere) <= set(await client.run_on_scheduler(_workers))


async def test_an_exception_keeps_its_type_with_the_remote_traceback(
    cluster: LocalCluster,
) -> None:
    """The task's exception reaches the caller as the same type and message, with the
    Dask worker's traceback (naming the raising function) as its cause."""
    async with serving(cluster) as (queue, _):
        with pytest.raises(LookupError, match="no such row") as info:
            await bounded(queue.run(fail_with, "no such row"))
        cause = info.value.__cause__
        assert isinstance(cause, corral.RemoteTraceback)
        assert "fail_with" in cause.tb
        assert "LookupError: no such row" in cause.tb
        assert await bounded(queue.run(add, 2, 2)) == 4  # the worker serves on


async def test_what_will_not_pickle_is_named(cluster: LocalCluster) -> None:
    """An argument (in the parent) or a result (in the Dask worker) that will not pickle
    fails its own job with ``SerializationError`` naming it; the worker serves on."""
    async with serving(cluster) as (queue, _):
        with pytest.raises(corral.SerializationError, match="argument 1 of add"):
            await bounded(queue.run(add, 1, threading.Lock()))
        with pytest.raises(corral.SerializationError, match="the result of make_lock"):
            await bounded(queue.run(make_lock))
        assert await bounded(queue.run(add, 1, 1)) == 2


async def test_a_dask_worker_killed_mid_task(tmp_path: Path) -> None:
    """A Dask worker process killed while running a job: the job fails with
    ``WorkerLostError`` (Dask's allowed-failures set to 0, so Dask does not rerun it), or
    runs again while it has ``retries``; the DaskWorker itself serves on."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        async with (
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                asynchronous=True,
            ) as local,
            Client(local, asynchronous=True) as client,
            corral.TaskQueue() as queue,
        ):
            worker = DaskWorker(client)
            await bounded(queue.attach(worker))
            with pytest.raises(corral.WorkerLostError, match="Dask worker running it died"):
                await bounded(queue.run(kill_own_process))
            assert worker.alive
            pid = await bounded(queue.run(die_once, str(tmp_path / "died"), retries=1))
            assert pid != os.getpid()
            assert await bounded(queue.run(add, 3, 4)) == 7


async def test_iterating_100k_items_keeps_parent_memory_bounded(cluster: LocalCluster) -> None:
    """100,000 items of 1 KiB (100 MiB in all) stream from a generator in a Dask worker,
    in order, pulled a batch at a time as the consumer's credit allows: the parent's
    resident memory (which holds the scheduler too) grows by a small part of that."""
    process = psutil.Process()
    n, size = 100_000, 1024
    async with serving(cluster) as (queue, _):
        await bounded(queue.run(add, 0, 0))
        baseline = peak = process.memory_info().rss
        count = 0
        async for item in queue.iterate(chunks, n, size):
            assert item[:8] == count.to_bytes(8, "little")
            count += 1
            if count % 2000 == 0:
                peak = max(peak, process.memory_info().rss)
        assert count == n
    growth = peak - baseline
    assert growth < 25 * 1024 * 1024, f"parent memory grew by {growth / 2**20:.1f} MiB"


async def test_breaking_out_of_a_stream_closes_its_generator(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """Leaving ``async for`` early closes the generator in the Dask worker: its
    ``finally`` runs there."""
    flag = tmp_path / "closed"
    async with serving(cluster) as (queue, _):
        async for item in queue.iterate(endless_with_finally, str(flag)):
            if item == 5000:
                break
        deadline = time.monotonic() + BOUND
        while not flag.exists():
            assert time.monotonic() < deadline, "the generator was never closed"
            await asyncio.sleep(0.02)
        assert await bounded(queue.run(add, 1, 1)) == 2


async def test_reports_arrive_in_order_before_the_result(cluster: LocalCluster) -> None:
    """``corral.report`` in a Dask task reaches the caller in order, every one of them
    before the job's result."""
    async with serving(cluster) as (queue, _):
        job = queue.submit(report_each, 200)
        order: list[str] = []
        settled = asyncio.Event()
        job.on_report(lambda obj: order.append(f"report {obj['step']}"))
        job.add_done_callback(lambda _: (order.append("result"), settled.set()))
        reports = [obj async for obj in job.reports()]
        assert await bounded(job) == "finished"
        await bounded(settled.wait())  # done-callbacks run in a later turn of the loop
        assert reports == [{"step": i} for i in range(200)]
        assert order == [*(f"report {i}" for i in range(200)), "result"]


async def test_a_hard_time_limit_on_a_stuck_remote_task(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """A task stuck past its hard limit: the caller gets ``TimeLimitExceeded`` within a
    second of the limit and the task is released from the scheduler, though its Dask
    thread runs on until the function returns (the scheduler, which thinks that thread
    free, may give its worker another task, which waits for it); the queue serves on."""
    flag = tmp_path / "release"
    try:
        async with serving(cluster) as (queue, client):
            start = time.monotonic()
            with pytest.raises(corral.TimeLimitExceeded):
                await bounded(queue.run(stuck_until, str(flag), time_limit=1.0, series=GPU))
            elapsed = time.monotonic() - start
            assert 1.0 <= elapsed < 2.0, elapsed
            deadline = time.monotonic() + BOUND
            while any("stuck_until" in k for k in await client.run_on_scheduler(_task_keys)):
                assert time.monotonic() < deadline, "the stuck task was never released"
                await asyncio.sleep(0.02)
            flag.touch()  # the Dask thread ends
            assert await bounded(queue.run(add, 6, 6, series=GPU)) == 12
    finally:
        flag.touch()


async def test_cancelling_a_running_call_answers_at_once(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """Cancelling a job whose call runs in Dask: the caller gets ``CancelledError`` at
    once and the task is released in Dask (its thread runs on until the call returns);
    the worker's slot serves the next job."""
    flag = tmp_path / "release"
    try:
        async with serving(cluster) as (queue, client):
            job = queue.submit(stuck_until, str(flag), True, series=GPU)
            assert await bounded(anext(job.reports())) == "running"
            start = time.monotonic()
            job.cancel()
            with pytest.raises(asyncio.CancelledError):
                await job
            assert time.monotonic() - start < 0.5
            deadline = time.monotonic() + BOUND
            while any("stuck_until" in k for k in await client.run_on_scheduler(_task_keys)):
                assert time.monotonic() < deadline, "the cancelled task was never released"
                await asyncio.sleep(0.02)
            flag.touch()
            assert await bounded(queue.run(add, 1, 2, series=GPU)) == 3
    finally:
        flag.touch()


async def test_a_soft_time_limit_is_raised_inside_the_remote_call(cluster: LocalCluster) -> None:
    """The soft limit is raised inside the call in its Dask thread, which may catch it."""
    async with serving(cluster) as (queue, _):
        result = await bounded(queue.run(catch_soft_limit, soft_time_limit=0.3))
        assert result == "caught: the task ran past its soft time limit of 0.3 s"


async def test_slots_cap_the_tasks_on_the_cluster(cluster: LocalCluster) -> None:
    """With ``slots=1`` a DaskWorker keeps one task on the cluster at a time, although the
    host sends it several: the calls never overlap, even with two Dask workers free."""
    async with (
        connect(cluster) as client,
        corral.TaskQueue(strategy="prefetch", prefetch=6) as queue,
    ):
        await bounded(queue.attach(DaskWorker(client, slots=1)))
        spans = sorted(await bounded(asyncio.gather(*(queue.run(span, 0.1) for _ in range(6)))))
        assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans))


async def test_an_address_makes_a_client_of_its_own_closed_on_stop(
    cluster: LocalCluster,
) -> None:
    """Given the scheduler's address, the DaskWorker connects on the queue's loop and
    closes that client when it stops."""
    worker = DaskWorker(cluster.scheduler_address)
    async with corral.TaskQueue() as queue:
        await bounded(queue.attach(worker))
        assert await bounded(queue.run(add, 20, 22)) == 42
        client = worker.client
    assert client.status == "closed"
    assert not worker.alive


def test_a_bad_target_is_refused_at_construction() -> None:
    """Neither a client nor an address: a ``TypeError`` that says what is expected."""
    with pytest.raises(TypeError, match=r"distributed\.Client or a scheduler address"):
        DaskWorker(8786)
    with pytest.raises(ValueError, match="slots must be a positive int"):
        DaskWorker("tcp://127.0.0.1:8786", slots=0)


def test_without_dask_import_corral_works_and_dask_worker_says_how_to_install() -> None:
    """With ``distributed`` missing, ``import corral`` still works and making a DaskWorker
    raises ``ImportError`` with the command that installs it."""
    code = (
        "import sys\n"
        "sys.modules['distributed'] = None\n"
        "import corral\n"
        "from corral.workers import DaskWorker\n"
        "try:\n"
        "    DaskWorker('tcp://127.0.0.1:8786')\n"
        "except ImportError as exc:\n"
        "    print('ImportError:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=BOUND, check=True
    )
    assert "ImportError: DaskWorker needs dask.distributed: pip install 'corral[dask]'" in (
        done.stdout
    )


def test_a_synchronous_client_is_refused_at_construction(cluster: LocalCluster) -> None:
    """A synchronous client cannot serve a queue on an event loop: ``ValueError`` when the
    DaskWorker is made (as ``Pool(cluster=client)`` says), not a start-up failure later."""
    with (
        Client(cluster.scheduler_address) as client,
        pytest.raises(ValueError, match=r"asynchronous=True on the event loop.*address"),
    ):
        DaskWorker(client)
