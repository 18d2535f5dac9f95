"""``ProcessWorker`` on its own, driven by a tiny host: the worker contract (start, send,
job_started / job_done / worker_lost, stop, kill) with a real process behind it."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from typing import Any, Self, TypeVar

import psutil
import pytest

import corral
from corral import Job
from corral._job import new_job
from corral.workers import ProcessWorker, Worker
from tests import tasks
from tests.hosts import send

T = TypeVar("T")

BOUND = 30.0

START_METHODS = ["fork", "forkserver", "spawn"]


class Host:
    """Records what a worker reports; each job's outcome and the loss are futures."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.events: list[tuple[str, int]] = []
        self.outcomes: dict[int, asyncio.Future[tuple[Any, BaseException | None]]] = {}
        self.lost: asyncio.Future[tuple[corral.CorralError, list[Job[Any]], list[Job[Any]]]] = (
            loop.create_future()
        )
        self.started: dict[int, asyncio.Event] = {}
        self._ids = 0

    def job(self, fn: Callable[..., Any], *args: Any) -> Job[Any]:
        """A new job for fn(*args), owned by this host."""
        loop = asyncio.get_running_loop()
        self._ids += 1
        job: Job[Any] = new_job(self, self._ids, fn, args, loop)
        self.outcomes[job.id] = loop.create_future()
        self.started[job.id] = asyncio.Event()
        return job

    async def outcome(self, job: Job[Any]) -> tuple[Any, BaseException | None]:
        """Wait (bounded) for job_done of job: (value, error)."""
        return await asyncio.wait_for(self.outcomes[job.id], BOUND)

    async def loss(self) -> tuple[corral.CorralError, list[Job[Any]], list[Job[Any]]]:
        """Wait (bounded) for worker_lost: (error, unstarted, started)."""
        return await asyncio.wait_for(asyncio.shield(self.lost), BOUND)

    # -- WorkerHost --------------------------------------------------------------------

    def job_started(self, worker: Worker, job: Job[Any]) -> None:
        self.events.append(("started", job.id))
        self.started[job.id].set()

    def job_done(
        self, worker: Worker, job: Job[Any], value: Any, error: BaseException | None
    ) -> None:
        self.events.append(("done", job.id))
        self.outcomes[job.id].set_result((value, error))

    def worker_lost(
        self,
        worker: Worker,
        error: corral.CorralError,
        unstarted: list[Job[Any]],
        started: list[Job[Any]],
    ) -> None:
        self.events.append(("lost", 0))
        assert not self.lost.done(), "worker_lost reported twice"
        self.lost.set_result((error, unstarted, started))

    # -- JobOwner ----------------------------------------------------------------------

    def cancel_job(self, job: Job[Any]) -> None:
        pass


class Beacon:
    """A loopback server that jobs running ``tasks.beacon_then_sleep`` connect to, so the
    test knows a job is running, and in which process."""

    async def __aenter__(self) -> Self:
        self._pids: asyncio.Queue[int] = asyncio.Queue()
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.port: int = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._pids.put(int(await reader.readline()))
        finally:
            writer.close()
            await writer.wait_closed()

    async def running(self) -> int:
        """Wait for the next job to say it is running; returns its process id."""
        return await asyncio.wait_for(self._pids.get(), BOUND)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _gone(pid: int) -> bool:
    """Whether pid has exited and been reaped (a zombie still counts as not gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_DEAD
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("start_method", START_METHODS)
async def test_runs_a_job_and_reports_started_then_done(start_method: str) -> None:
    """A started worker runs a job in its own process and reports job_started, then
    job_done with the value; stop() ends it without reporting a loss."""
    host = Host()
    worker = ProcessWorker(start_method=start_method)
    await asyncio.wait_for(worker.start(host), BOUND)
    try:
        assert worker.alive
        pid = worker.pid
        assert pid is not None
        assert pid != os.getpid()
        job = host.job(tasks.add, 2, 3)
        send(worker, job)
        assert await host.outcome(job) == (5, None)
        job2 = host.job(tasks.pid)
        send(worker, job2)
        assert await host.outcome(job2) == (pid, None)
        # job_started is optional for a worker; when reported, it comes before job_done.
        assert [e for e in host.events if e[0] == "done"] == [("done", 1), ("done", 2)]
        for job_id in (1, 2):
            if ("started", job_id) in host.events:
                assert host.events.index(("started", job_id)) < host.events.index(("done", job_id))
        assert worker.in_flight == 0
    finally:
        await asyncio.wait_for(worker.stop(), BOUND)
    assert not worker.alive
    assert _gone(pid)
    assert not host.lost.done()


async def test_task_exception_is_reported_as_job_done_with_error() -> None:
    """A task's exception comes back through job_done as the same type with the worker's
    traceback as its __cause__; the worker keeps serving."""
    host = Host()
    worker = ProcessWorker()
    await asyncio.wait_for(worker.start(host), BOUND)
    try:
        job = host.job(tasks.fail, "boom")
        send(worker, job)
        value, error = await host.outcome(job)
        assert value is None
        assert isinstance(error, ValueError)
        assert str(error) == "boom"
        assert isinstance(error.__cause__, corral.RemoteTraceback)
        assert "in fail" in error.__cause__.tb
        job2 = host.job(tasks.add, 1, 1)
        send(worker, job2)
        assert await host.outcome(job2) == (2, None)
    finally:
        await asyncio.wait_for(worker.stop(), BOUND)


async def test_stop_finishes_the_jobs_already_sent() -> None:
    """stop() lets every job already sent run to its end before the process exits."""
    host = Host()
    worker = ProcessWorker()
    await asyncio.wait_for(worker.start(host), BOUND)
    jobs = [host.job(tasks.sleep, 0.01 * i) for i in range(5)]
    for job in jobs:
        send(worker, job)
    await asyncio.wait_for(worker.stop(), BOUND)
    for i, job in enumerate(jobs):
        assert host.outcomes[job.id].result() == (0.01 * i, None)
    assert not host.lost.done()


@pytest.mark.parametrize("start_method", START_METHODS)
async def test_kill_reaps_the_process_and_closes_its_fds(start_method: str) -> None:
    """When kill() returns, the process has exited and been reaped, and every fd the
    worker opened in this process is closed; an idle worker killed on purpose reports no
    loss."""
    host = Host()
    fds_before = _fds()
    worker = ProcessWorker(start_method=start_method)
    await asyncio.wait_for(worker.start(host), BOUND)
    pid = worker.pid
    assert pid is not None
    assert _fds() > fds_before
    await asyncio.wait_for(worker.kill(), BOUND)
    assert not worker.alive
    assert _gone(pid)
    assert _fds() == fds_before
    assert not host.lost.done()


async def test_pid_and_rss_of_a_dead_worker_do_not_raise() -> None:
    """After the worker is gone, ``pid`` still answers (its old pid or None) and ``rss()``
    says None, as documented, instead of raising."""
    host = Host()
    worker = ProcessWorker()
    await asyncio.wait_for(worker.start(host), BOUND)
    pid = worker.pid
    rss = worker.rss()
    assert rss is not None
    assert rss > 0
    await asyncio.wait_for(worker.kill(), BOUND)
    assert worker.pid in (pid, None)
    assert worker.rss() is None


async def test_killed_worker_reports_sent_but_unacknowledged_jobs_as_unstarted() -> None:
    """A worker killed while running one job with two more sent behind it reports the
    running one as started and the two others as unstarted, in the order sent, with the
    signal that killed it."""
    host = Host()
    worker = ProcessWorker()
    async with Beacon() as beacon:
        await asyncio.wait_for(worker.start(host), BOUND)
        running = host.job(tasks.beacon_then_sleep, beacon.port, 60)
        send(worker, running)
        assert await beacon.running() == worker.pid
    behind = [host.job(tasks.add, 1, i) for i in range(2)]
    for job in behind:
        send(worker, job)
    assert worker.in_flight == 3
    await asyncio.wait_for(worker.kill(), BOUND)
    error, unstarted, started = await host.loss()
    assert isinstance(error, corral.WorkerLostError)
    assert error.signal == signal.SIGKILL
    assert error.exitcode is None
    assert started == [running]
    assert unstarted == behind
    assert ("started", behind[0].id) not in host.events
    assert worker.in_flight == 0


async def test_worker_killed_from_outside_while_idle_reports_loss() -> None:
    """A worker SIGKILLed by someone else while idle reports worker_lost with the signal
    and no jobs; its fds are closed."""
    host = Host()
    fds_before = _fds()
    worker = ProcessWorker()
    await asyncio.wait_for(worker.start(host), BOUND)
    pid = worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    error, unstarted, started = await host.loss()
    assert isinstance(error, corral.WorkerLostError)
    assert (error.exitcode, error.signal) == (None, signal.SIGKILL)
    assert unstarted == started == []
    assert not worker.alive
    assert _fds() == fds_before


async def test_task_exit_reports_the_exit_code() -> None:
    """A task that calls os._exit(5) loses its worker: worker_lost carries exitcode 5 and
    the job as started."""
    host = Host()
    worker = ProcessWorker()
    await asyncio.wait_for(worker.start(host), BOUND)
    job = host.job(tasks.exit_now, 5)
    send(worker, job)
    error, unstarted, started = await host.loss()
    assert isinstance(error, corral.WorkerLostError)
    assert (error.exitcode, error.signal) == (5, None)
    assert started == [job]
    assert unstarted == []


class KillsWhenUnpickled:
    """An argument whose unpickling ends the process that unpickles it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os._exit, (1,))


async def test_argument_that_kills_on_unpickling_counts_a_delivery() -> None:
    """A job whose argument kills the worker while being unpickled was never acknowledged:
    it is reported unstarted, with one delivery counted against it."""
    host = Host()
    worker = ProcessWorker()
    await asyncio.wait_for(worker.start(host), BOUND)
    job = host.job(tasks.identity, KillsWhenUnpickled())
    send(worker, job)
    error, unstarted, started = await host.loss()
    assert isinstance(error, corral.WorkerLostError)
    assert error.exitcode == 1
    assert unstarted == [job]
    assert started == []
    assert job.deliveries == 1
    assert ("started", job.id) not in host.events


@pytest.mark.timeout(30)
async def test_failed_start_holds_no_resources() -> None:
    """When start() raises WorkerStartupError (the initializer raised), the worker holds
    nothing any more: its process is gone and its fds are closed, even when the process
    takes a moment to exit (the initializer left a thread running)."""
    host = Host()
    fds_before = _fds()
    worker = ProcessWorker(initializer=tasks.raise_leaving_a_thread, initargs=("bad config", 0.5))
    with pytest.raises(corral.WorkerStartupError) as info:
        await asyncio.wait_for(worker.start(host), BOUND)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert str(info.value.__cause__) == "bad config"
    assert not worker.alive
    assert _fds() == fds_before


@pytest.mark.parametrize("bad", [0, -1.5, True, "1"])
def test_a_bad_startup_timeout_is_refused_at_construction(bad: Any) -> None:
    """``startup_timeout`` is a positive number of seconds, as every time option is: a bool
    (taken as 1 s) or a string (a TypeError from a comparison) is refused by name."""
    with pytest.raises(ValueError, match="startup_timeout must be a positive number of seconds"):
        ProcessWorker(startup_timeout=bad)
