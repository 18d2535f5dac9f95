"""Losing the Dask scheduler: each test starts a cluster of its own (a ``dask scheduler``
process and one ``dask worker`` process of one thread, on loopback), SIGKILLs the
scheduler and checks what every call gets. A call on the cluster fails at once with
``WorkerLostError``; a call sent to a DaskWorker while its client tries to reconnect fails
the same way once the client gives up; a call that never reached Dask is not failed with
a wrong error but goes back to the queue; a stream waiting for its consumer ends with
``WorkerLostError``; a pool replaces its dead DaskWorkers, gives up after
``MAX_STARTUP_FAILURES`` failed starts on the closed client and fails the calls still
waiting with ``WorkerStartupError``. Nothing hangs, and nothing is left open."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

import corral
from corral._sources import MAX_STARTUP_FAILURES
from corral.workers import DaskWorker
from tests.test_dask_worker import add, chunks, stuck_until
from tests.waits import BOUND, bounded, until

ROOT = Path(__file__).resolve().parents[1]  # the Dask worker imports tests.* from here

# How long a client tries to reconnect to a lost scheduler before it closes (its
# ``timeout``): short, so the calls waiting for it fail soon.
RECONNECT = 2.0

# A call running on the cluster must fail within this of the scheduler's death (it takes
# milliseconds: the client's connection drops and it cancels its futures at once).
PROMPT = 5.0

# Calls waiting for the client's reconnection must fail within this of the scheduler's
# death: RECONNECT, then the pool's failed starts (0.3 s of back-off), with room to spare
# on a slow machine.
WITHIN = 20.0


class Cluster:
    """A scheduler process and one single-thread worker process, their logs in tmp; see
    ``cluster``."""

    def __init__(self, tmp: Path) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs = tmp
        self.address = ""

    def start(self) -> None:
        """Start the scheduler, then the worker; return once the worker has registered."""
        info = self.logs / "scheduler.json"
        self.scheduler = self._start(
            "scheduler",
            "distributed.cli.dask_scheduler",
            *("--host", "127.0.0.1", "--port", "0", "--no-dashboard"),
            *("--scheduler-file", str(info)),
        )
        self.address = str(self._wait(lambda: json.loads(info.read_text())["address"]))
        self._start(
            "worker",
            "distributed.cli.dask_worker",
            self.address,
            *("--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1"),
        )
        worker_log = self.logs / "worker.log"
        self._wait(lambda: "Registered to" in worker_log.read_text())

    def _start(self, name: str, module: str, *args: str) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", module, *args], stdout=log, stderr=log, cwd=ROOT
            )
        self.processes.append(process)
        return process

    def _wait(self, ready: Callable[[], Any]) -> Any:
        """Wait (bounded) until ready() gives something, failing early if a process died."""
        deadline = time.monotonic() + BOUND
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError):
                found = ready()
                if found:
                    return found
            for process in self.processes:
                if process.poll() is not None:
                    logs = {p.name: p.read_text() for p in self.logs.glob("*.log")}
                    pytest.fail(f"a process of the cluster exited at start: {logs}")
            assert time.monotonic() < deadline, "the cluster did not start"
            time.sleep(0.02)

    def kill_scheduler(self) -> float:
        """SIGKILL the scheduler (and reap it); returns when, on the monotonic clock."""
        self.scheduler.kill()
        self.scheduler.wait(BOUND)
        return time.monotonic()

    def close(self) -> None:
        """Kill and reap every process started."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(BOUND)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of the test's own, whose scheduler it may kill: a ``dask scheduler``
    process and a ``dask worker`` process (no nanny, one thread) registered with it; both
    are killed and reaped after the test, before the leak check counts processes."""
    local = Cluster(tmp_path)
    try:
        local.start()
        yield local
    finally:
        local.close()


async def running_on(queue: corral.TaskQueue, flag: Path, **options: Any) -> corral.Job[str]:
    """Submit a call that holds the cluster's only thread; return once it runs there."""
    job = queue.submit(stuck_until, str(flag), True, **options)
    assert await bounded(anext(job.reports())) == "running"
    return job


async def lost(job: corral.Job[Any], since: float, within: float) -> corral.WorkerLostError:
    """Await job, which must fail with ``WorkerLostError`` within seconds of since."""
    with pytest.raises(corral.WorkerLostError) as info:
        await bounded(job)
    assert time.monotonic() - since < within
    return info.value


# -- a TaskQueue with DaskWorkers attached ------------------------------------------------


@pytest.mark.parametrize("target", ["address", "client"])
async def test_a_running_call_fails_at_once_and_unsent_calls_go_back_to_the_queue(
    cluster: Cluster, tmp_path: Path, target: str
) -> None:
    """``queue.attach(DaskWorker(address))`` (its own client) or ``DaskWorker(client)`` (a
    shared one): when the scheduler dies, the call running on the cluster fails within
    milliseconds with ``WorkerLostError`` and the DaskWorker dies. A call it held back
    (``slots=1``) never reached Dask: it goes back to the queue, ahead of the call that
    waited there, and both wait for a worker, as on any queue whose last worker died."""
    async with (
        Client(cluster.address, asynchronous=True, timeout=RECONNECT) as client,
        corral.TaskQueue(strategy="prefetch", prefetch=2) as queue,
    ):
        worker = DaskWorker(cluster.address if target == "address" else client, slots=1)
        await bounded(queue.attach(worker))
        running = await running_on(queue, tmp_path / "never")
        held = queue.submit(add, 1, 2)  # sent to the DaskWorker, beyond its slot
        queued = queue.submit(add, 3, 4)  # beyond the queue's prefetch: in the queue
        killed = cluster.kill_scheduler()
        error = await lost(running, killed, PROMPT)
        assert "lost the scheduler" in str(error)
        assert not worker.alive
        assert queue.workers == []
        assert held.state is queued.state is corral.JobState.PENDING
        if target == "address":
            await until(lambda: worker.client is None)  # it closes its own client
        held.cancel()
        queued.cancel()


async def test_a_shared_client_that_gives_up_reconnecting(cluster: Cluster, tmp_path: Path) -> None:
    """DaskWorkers sharing a client whose ``timeout`` is RECONNECT seconds: the running
    call fails at once; a call sent to another DaskWorker while the client tries to
    reconnect fails with ``WorkerLostError`` when it gives up; a call sent, after that, to
    a DaskWorker that had nothing to notice it by goes back to the queue (not failed
    with a wrong error) and that DaskWorker leaves; a DaskWorker attached on the closed
    client fails to start with ``WorkerStartupError``."""
    async with (
        Client(cluster.address, asynchronous=True, timeout=RECONNECT) as client,
        corral.TaskQueue() as queue,
    ):
        await bounded(queue.attach(DaskWorker(client)))
        running = await running_on(queue, tmp_path / "never")
        spare = DaskWorker(client, series=["spare"])
        late = DaskWorker(client, series=["late"])
        await bounded(queue.attach(spare))
        await bounded(queue.attach(late))
        killed = cluster.kill_scheduler()
        await lost(running, killed, PROMPT)
        assert client.status == "connecting"
        await lost(queue.submit(add, 1, 2, series="spare"), killed, WITHIN)
        assert not spare.alive
        await until(lambda: client.status == "closed")
        after = queue.submit(add, 3, 4, series="late")
        await until(lambda: not late.alive or after.done())
        assert not after.done(), f"failed with {after.exception()!r}"
        assert after.state is corral.JobState.PENDING
        assert queue.workers == []
        with pytest.raises(corral.WorkerStartupError, match="client is closed"):
            await bounded(queue.attach(DaskWorker(client)))
        after.cancel()


# -- Pool(cluster=...) ---------------------------------------------------------------------


@pytest.mark.parametrize("target", ["address", "client"])
async def test_a_pool_replaces_its_dask_workers_then_gives_up(
    cluster: Cluster, tmp_path: Path, target: str
) -> None:
    """``Pool(cluster=address, startup_timeout=RECONNECT)`` (its own client) or
    ``Pool(cluster=client)`` (a client whose timeout is RECONNECT): the running call fails
    at once with ``WorkerLostError``; the pool's replacement, started on the reconnecting
    client, takes the queued call, which fails the same way when the client gives up;
    the replacements that follow fail to start on the closed client, and after
    ``MAX_STARTUP_FAILURES`` of them the pool gives up: the call still waiting fails with
    ``WorkerStartupError``, as do later calls at once, and ``close`` returns promptly."""
    async with Client(cluster.address, asynchronous=True, timeout=RECONNECT) as client:
        pool = corral.Pool(
            cluster=cluster.address if target == "address" else client,
            startup_timeout=RECONNECT,
        )
        try:
            await bounded(pool.start())
            assert pool.size == 1  # the cluster's one thread
            running = await running_on(pool, tmp_path / "never")
            queued = pool.submit(add, 1, 2)
            killed = cluster.kill_scheduler()
            await lost(running, killed, PROMPT)
            after = pool.submit(add, 3, 4)  # while the client reconnects
            await lost(queued, killed, WITHIN)
            with pytest.raises(corral.WorkerStartupError, match="client is closed") as info:
                await bounded(after)
            assert time.monotonic() - killed < WITHIN
            assert info.value.attempts == MAX_STARTUP_FAILURES
            with pytest.raises(corral.WorkerStartupError, match="client is closed"):
                pool.submit(add, 5, 6)
            assert pool.workers == []
        finally:
            began = time.monotonic()
            await bounded(pool.close())
            assert time.monotonic() - began < PROMPT


async def test_a_stream_waiting_for_its_consumer_ends_with_worker_lost(
    cluster: Cluster,
) -> None:
    """A stream whose window is full (no pull on the cluster) when the scheduler dies, and
    whose consumer comes back only after the client gave up: the consumer gets every item
    already sent, in order, then ``WorkerLostError`` (not an error blaming the call), and
    the DaskWorker is dead."""
    async with (
        Client(cluster.address, asynchronous=True, timeout=RECONNECT) as client,
        corral.TaskQueue() as queue,
    ):
        worker = DaskWorker(client)
        await bounded(queue.attach(worker))
        stream = queue.iterate(chunks, 100, 8, window=10)
        sent = stream.job.stream
        assert sent is not None
        await until(lambda: len(sent.items) == 10)  # its credit is spent
        cluster.kill_scheduler()
        await until(lambda: client.status == "closed")
        taken = []
        with pytest.raises(corral.WorkerLostError, match="lost the scheduler"):
            async for item in stream:
                taken.append(item)
        assert taken == list(chunks(10, 8))
        assert not worker.alive
