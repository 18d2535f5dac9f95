"""The pool's core behaviour, with real worker processes: results, worker deaths of every
kind, bad input, functions pickled by value, closing and terminating, start-up failures and
leaks over many replacements.

Tests never sleep to synchronise: a job that must be known to be running tells the test so
through a ``Beacon`` (a loopback socket), and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import psutil
import pytest

import corral
from tests import tasks
from tests.waits import bounded, until

START_METHODS = ["fork", "forkserver", "spawn"]


class Beacon:
    """A loopback server that jobs running ``tasks.beacon_then_sleep`` or
    ``tasks.beacon_then`` connect to, so the test knows a job is running, and in which
    process; ``release()`` lets the ``beacon_then`` jobs go on."""

    async def __aenter__(self) -> Self:
        self._arrivals: asyncio.Queue[tuple[int, asyncio.StreamWriter]] = asyncio.Queue()
        self._writers: list[asyncio.StreamWriter] = []
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.port: int = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        while not self._arrivals.empty():
            self._writers.append(self._arrivals.get_nowait()[1])
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await self._server.wait_closed()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        self._arrivals.put_nowait((int(line), writer))

    async def running(self) -> int:
        """Wait for the next job to say it is running; returns its process id."""
        pid, writer = await bounded(self._arrivals.get())
        self._writers.append(writer)
        return pid

    def release(self) -> None:
        """Let every job that reported so far go on."""
        for writer in self._writers:
            writer.write(b"go\n")


def appended(path: Path) -> list[tuple[str, int]]:
    """The (text, pid) lines that ``tasks.append_line`` wrote to path."""
    if not path.exists():
        return []
    return [
        (text, int(pid)) for text, pid in (line.split() for line in path.read_text().splitlines())
    ]


async def serves_100_calls(pool: corral.Pool) -> None:
    """The pool still answers correctly: 100 separate calls."""
    results = await bounded(asyncio.gather(*(pool.run(tasks.square, i) for i in range(100))))
    assert results == [i * i for i in range(100)]


class KillsWhenUnpickled:
    """An argument whose unpickling ends the process that unpickles it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os._exit, (1,))


class HoldsALock:
    """A callable object that cannot be pickled: it holds a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self) -> int:
        return 1


# -- results -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strategy", ["fair", "prefetch"])
@pytest.mark.parametrize("start_method", START_METHODS)
async def test_ten_thousand_calls_are_answered_correctly(start_method: str, strategy: str) -> None:
    """10,000 separate calls and a 10,000-item map on 2 workers return every result, in
    order, under each strategy and start method; both workers take part."""
    n = 10_000
    async with corral.Pool(2, start_method=start_method, strategy=strategy) as pool:
        jobs = [pool.submit(tasks.square, i) for i in range(n)]
        assert await bounded(asyncio.gather(*jobs)) == [i * i for i in range(n)]
        assert sum(w.tasks_done for w in pool.workers) == n
        assert all(w.tasks_done > 0 for w in pool.workers)
        assert await bounded(pool.map(tasks.square, range(n))) == [i * i for i in range(n)]


async def test_map_with_chunksize_one_keeps_order() -> None:
    """map() with chunksize=1 (one job per item) returns results in input order even though
    two workers finish them in any order."""
    async with corral.Pool(2, strategy="prefetch") as pool:
        xs = list(range(500))
        assert await bounded(pool.map(tasks.square, xs, chunksize=1)) == [x * x for x in xs]


# -- a task's own exception ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "error"), [(tasks.fail, ValueError), (tasks.raise_task_error, tasks.TaskError)]
)
async def test_task_exception_keeps_its_type_with_remote_traceback(
    fn: Callable[[str], None], error: type[Exception]
) -> None:
    """A task's exception reaches the caller as the same type and message, its __cause__ a
    RemoteTraceback whose text names the function that raised in the worker; the worker
    survives it."""
    async with corral.Pool(1) as pool:
        (worker,) = pool.workers
        with pytest.raises(error, match=r"^boom$") as info:
            await bounded(pool.run(fn, "boom"))
        cause = info.value.__cause__
        assert isinstance(cause, corral.RemoteTraceback)
        assert f"in {fn.__name__}" in cause.tb
        assert "tests/tasks.py" in cause.tb
        assert pool.workers == [worker]
        assert await bounded(pool.run(tasks.add, 1, 2)) == 3


# -- worker deaths -------------------------------------------------------------------------

DEATHS = {
    # kind: (expected exitcode, expected signal)
    "os._exit": (7, None),
    "segfault": (None, signal.SIGSEGV),
    "SIGKILL from outside": (None, signal.SIGKILL),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("death", list(DEATHS))
async def test_worker_death_while_running(death: str, tmp_path: Path) -> None:
    """A worker dies while running a job (the task exits, segfaults, or the worker is
    SIGKILLed from outside): that job fails with WorkerLostError carrying the exit code or
    the signal; the jobs written to the dead worker behind it but never acknowledged run
    exactly once, in other processes; the pool replaces the worker and serves 100 more calls.
    """
    exitcode, sig = DEATHS[death]
    log = tmp_path / "log"
    async with Beacon() as beacon, corral.Pool(2, strategy="prefetch", prefetch=4) as pool:
        if death == "os._exit":
            killer = pool.submit(tasks.beacon_then, beacon.port, "exit", 7)
        elif death == "segfault":
            killer = pool.submit(tasks.beacon_then, beacon.port, "segfault")
        else:
            killer = pool.submit(tasks.beacon_then_sleep, beacon.port, 60)
        doomed_pid = await beacon.running()
        (doomed,) = [w for w in pool.workers if w.pid == doomed_pid]
        # While the killer runs, three jobs fill the rest of its worker's prefetch window
        # (written into its pipe at once, never read); four go to the other worker and
        # one waits in the queue.
        followers = [pool.submit(tasks.append_line, str(log), f"job-{i}") for i in range(3)]
        assert doomed.in_flight == 4
        followers += [pool.submit(tasks.append_line, str(log), f"job-{i}") for i in range(3, 8)]
        if death == "SIGKILL from outside":
            os.kill(doomed_pid, signal.SIGKILL)
        else:
            beacon.release()

        with pytest.raises(corral.WorkerLostError) as info:
            await bounded(killer)
        assert (info.value.exitcode, info.value.signal) == (exitcode, sig)

        assert await bounded(asyncio.gather(*followers)) == [f"job-{i}" for i in range(8)]
        runs = appended(log)
        assert Counter(text for text, _ in runs) == {f"job-{i}": 1 for i in range(8)}
        assert all(pid != doomed_pid for _, pid in runs)

        await until(lambda: len(pool.workers) == 2 and doomed not in pool.workers)
        await serves_100_calls(pool)


@pytest.mark.timeout(60)
async def test_idle_worker_death_is_noticed_and_replaced() -> None:
    """A worker SIGKILLed while idle is noticed with no job in sight and replaced by a new
    process; no call fails and the pool serves 100 more calls."""
    async with corral.Pool(2) as pool:
        doomed = pool.workers[0]
        doomed_pid = doomed.pid
        os.kill(doomed_pid, signal.SIGKILL)
        await until(lambda: len(pool.workers) == 2 and doomed not in pool.workers)
        assert doomed_pid not in {w.pid for w in pool.workers}
        await serves_100_calls(pool)


@pytest.mark.timeout(60)
async def test_jobs_sent_to_a_worker_killed_while_idle_run_once_elsewhere(tmp_path: Path) -> None:
    """Jobs written to an idle worker that was just SIGKILLed (before the pool could notice)
    were never acknowledged: each runs exactly once, in the replacement."""
    log = tmp_path / "log"
    async with corral.Pool(1, strategy="prefetch", prefetch=4) as pool:
        (doomed,) = pool.workers
        doomed_pid = doomed.pid
        os.kill(doomed_pid, signal.SIGKILL)
        # No await since the kill: the loop has not seen the death, so all four go to it.
        jobs = [pool.submit(tasks.append_line, str(log), f"job-{i}") for i in range(4)]
        assert doomed.in_flight == 4
        assert await bounded(asyncio.gather(*jobs)) == [f"job-{i}" for i in range(4)]
        runs = appended(log)
        assert Counter(text for text, _ in runs) == {f"job-{i}": 1 for i in range(4)}
        assert all(pid != doomed_pid for _, pid in runs)
        await serves_100_calls(pool)


@pytest.mark.timeout(60)
async def test_argument_that_kills_while_unpickled_fails_after_three_deliveries() -> None:
    """A job whose argument ends the process while it is unpickled is delivered a bounded
    number of times (3), then fails with WorkerLostError instead of killing workers
    forever; the pool keeps serving."""
    async with corral.Pool(2) as pool:
        job = pool.submit(tasks.identity, KillsWhenUnpickled())
        with pytest.raises(corral.WorkerLostError, match="killed 3 workers") as info:
            await bounded(job)
        assert info.value.exitcode == 1
        assert job.deliveries == 3
        await serves_100_calls(pool)


@pytest.mark.timeout(60)
async def test_healthy_job_queued_behind_crashing_jobs_is_not_blamed() -> None:
    """A healthy job that sat unacknowledged behind a running job that crashed its worker
    was not the cause of the crash: it runs, however often that happens to it.

    Three times a crashing job (priority -1) runs ahead of the healthy one on a worker with
    a prefetch window of 2, so the healthy job is written to each dying worker but never
    acknowledged. It must still run, not fail with "the job killed 3 workers"."""
    async with corral.Pool(1, strategy="prefetch", prefetch=2) as pool:
        crash = pool.submit(tasks.exit_now, 7, priority=-1)
        healthy = pool.submit(tasks.add, 1, 2)
        for _ in range(3):
            with pytest.raises(corral.WorkerLostError):
                await bounded(crash)
            # The replacement is not up yet: the next crash goes ahead of the healthy job.
            crash = pool.submit(tasks.exit_now, 7, priority=-1)
        with pytest.raises(corral.WorkerLostError):
            await bounded(crash)
        assert await bounded(healthy) == 3


# -- bad input -----------------------------------------------------------------------------


async def test_unpicklable_function_fails_at_submit() -> None:
    """A function that cannot be pickled raises SerializationError at submit, naming the
    function; nothing is sent and the pool keeps serving."""
    async with corral.Pool(1) as pool:
        (worker,) = pool.workers
        with pytest.raises(corral.SerializationError) as info:
            pool.submit(HoldsALock())
        assert "function" in info.value.what
        assert info.value.where == "in the parent"
        assert worker.in_flight == 0
        assert await bounded(pool.run(tasks.add, 1, 2)) == 3


async def test_unpicklable_argument_fails_at_submit() -> None:
    """An argument that cannot be pickled (a lock) raises SerializationError at submit,
    naming the argument; the pool keeps serving."""
    async with corral.Pool(1) as pool:
        (worker,) = pool.workers
        with pytest.raises(corral.SerializationError) as info:
            pool.submit(tasks.identity, threading.Lock())
        assert "argument 0" in info.value.what
        assert info.value.where == "in the parent"
        assert worker.in_flight == 0
        assert await bounded(pool.run(tasks.add, 1, 2)) == 3


@pytest.mark.parametrize("fn", [tasks.make_lock, tasks.make_generator])
async def test_unpicklable_result_fails_the_job_only(fn: Callable[[], Any]) -> None:
    """A result that cannot be pickled (a lock, a generator) fails its job with
    SerializationError naming the result; the worker lives on and keeps serving."""
    async with corral.Pool(1) as pool:
        (worker,) = pool.workers
        with pytest.raises(corral.SerializationError) as info:
            await bounded(pool.run(fn))
        assert "result" in info.value.what
        assert info.value.where == "in the worker"
        assert await bounded(pool.run(tasks.add, 1, 2)) == 3
        assert pool.workers == [worker]


async def test_argument_that_raises_while_unpickled_fails_the_job_only() -> None:
    """An argument whose unpickling raises in the worker fails its job with
    SerializationError (in the worker); the worker is not replaced and keeps serving."""
    async with corral.Pool(1) as pool:
        (worker,) = pool.workers
        with pytest.raises(corral.SerializationError) as info:
            await bounded(pool.run(tasks.identity, tasks.RaisesWhenUnpickled()))
        assert info.value.where == "in the worker"
        assert "cannot be unpickled" in str(info.value)
        assert await bounded(pool.run(tasks.add, 1, 2)) == 3
        assert pool.workers == [worker]


async def test_result_that_raises_while_unpickled_fails_the_job_only() -> None:
    """A result that pickles in the worker but raises when the parent unpickles it fails
    its job with SerializationError (in the parent); the pool keeps serving."""
    async with corral.Pool(1) as pool:
        (worker,) = pool.workers
        with pytest.raises(corral.SerializationError) as info:
            await bounded(pool.run(tasks.make_unloadable))
        assert "result" in info.value.what
        assert info.value.where == "in the parent"
        assert await bounded(pool.run(tasks.add, 1, 2)) == 3
        assert pool.workers == [worker]


async def test_large_arguments_and_results_cross_intact() -> None:
    """Arguments and results of several MiB (larger than a pipe, sent out of band) come
    back byte for byte, several at once on one worker."""
    payloads = [bytes([i]) * (3 * 1024 * 1024 + i) for i in range(4)]
    payloads.append(bytearray(os.urandom(5 * 1024 * 1024)))
    async with corral.Pool(1, strategy="prefetch", prefetch=4) as pool:
        results = await bounded(asyncio.gather(*(pool.run(tasks.identity, p) for p in payloads)))
        assert [bytes(r) for r in results] == [bytes(p) for p in payloads]


# -- functions pickled by value ------------------------------------------------------------


async def test_lambdas_and_closures_run() -> None:
    """Lambdas, closures over local variables and nested functions run in workers."""
    offset = 10

    def nested(x: int) -> int:
        return x + offset

    def make_multiplier(k: int) -> Callable[[int], int]:
        return lambda x: x * k

    async with corral.Pool(2) as pool:
        assert await bounded(pool.run(lambda x: x + 1, 1)) == 2
        assert await bounded(pool.run(nested, 1)) == 11
        assert await bounded(pool.run(make_multiplier(3), 5)) == 15
        assert await bounded(pool.map(make_multiplier(2), range(20))) == [2 * i for i in range(20)]


MAIN_SCRIPT = """
import asyncio
import sys

import corral


def triple(x):
    return 3 * x


async def main(method):
    async with corral.Pool(2, start_method=method) as pool:
        assert await pool.run(triple, 5) == 15
        assert await pool.map(triple, range(10)) == [3 * i for i in range(10)]
        assert await pool.run(lambda: __name__) in ("__main__", "__mp_main__")
    print("ok", method)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_functions_defined_in_main_run(start_method: str, tmp_path: Path) -> None:
    """A function defined in a script's __main__ runs through corral under forkserver and
    spawn, where the worker never executed the script's main block."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(MAIN_SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script), start_method],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ok {start_method}"


# -- closing and terminating ---------------------------------------------------------------


async def test_close_drains_queued_and_running_jobs() -> None:
    """close() lets running jobs finish and queued ones start and finish, then stops the
    workers: every job has its result."""
    async with corral.Pool(2) as pool:
        jobs = [pool.submit(tasks.sleep, 0.05 + i / 100) for i in range(8)]
        await bounded(pool.close())
        assert all(job.done() for job in jobs)
        assert [job.result() for job in jobs] == [0.05 + i / 100 for i in range(8)]
        assert pool.workers == []


async def test_close_drains_past_a_worker_death(tmp_path: Path) -> None:
    """A worker that dies while close() drains is replaced so the queued jobs still run:
    the crashing job fails with WorkerLostError, every other job completes once."""
    log = tmp_path / "log"
    async with corral.Pool(1) as pool:
        crash = pool.submit(tasks.exit_now, 7)
        queued = [pool.submit(tasks.append_line, str(log), f"job-{i}") for i in range(3)]
        await bounded(pool.close())
        assert isinstance(crash.exception(), corral.WorkerLostError)
        assert [job.result() for job in queued] == ["job-0", "job-1", "job-2"]
        assert Counter(text for text, _ in appended(log)) == {f"job-{i}": 1 for i in range(3)}


async def test_pool_without_async_with_starts_on_first_call() -> None:
    """A pool that was never entered or started starts its workers on the first call and
    closes cleanly."""
    pool = corral.Pool(2)
    try:
        assert await bounded(pool.run(tasks.add, 2, 2)) == 4
        assert await bounded(pool.map(tasks.square, range(10))) == [i * i for i in range(10)]
    finally:
        await bounded(pool.close())
    assert pool.workers == []


async def test_terminate_kills_and_cancels_unfinished_jobs() -> None:
    """terminate() kills the workers at once: running and queued jobs end cancelled
    (awaiting them raises CancelledError) and the processes are gone when it returns."""
    async with Beacon() as beacon, corral.Pool(2) as pool:
        running = [pool.submit(tasks.beacon_then_sleep, beacon.port, 60) for _ in range(2)]
        queued = [pool.submit(tasks.sleep, 60) for _ in range(3)]
        pids = {await beacon.running(), await beacon.running()}
        assert pids == {w.pid for w in pool.workers}
        started = time.monotonic()
        await bounded(pool.terminate())
        assert time.monotonic() - started < 10
        for job in running + queued:
            assert job.cancelled()
            with pytest.raises(asyncio.CancelledError):
                await job
        for pid in pids:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


async def test_calls_after_close_raise_pool_closed() -> None:
    """submit, run and map on a closed pool raise PoolClosedError."""
    async with corral.Pool(1) as pool:
        pass
    with pytest.raises(corral.PoolClosedError):
        pool.submit(tasks.add, 1, 2)
    with pytest.raises(corral.PoolClosedError):
        await pool.run(tasks.add, 1, 2)
    with pytest.raises(corral.PoolClosedError):
        await pool.map(tasks.square, range(3))


async def test_calls_after_terminate_raise_pool_closed() -> None:
    """submit and run on a terminated pool raise PoolClosedError."""
    async with corral.Pool(1) as pool:
        await pool.terminate()
        with pytest.raises(corral.PoolClosedError):
            pool.submit(tasks.add, 1, 2)
        with pytest.raises(corral.PoolClosedError):
            await pool.run(tasks.add, 1, 2)


async def test_close_is_idempotent() -> None:
    """close() may be called again after it returned, and leaving `async with` after it is
    harmless."""
    async with corral.Pool(1) as pool:
        assert await bounded(pool.run(tasks.add, 1, 2)) == 3
        await bounded(pool.close())
        await bounded(pool.close())
    await bounded(pool.close())
    assert pool.closed


async def test_concurrent_close_calls_all_return() -> None:
    """Two close() calls made while a job runs both return once it is done (a second
    closer must not strand the first)."""
    async with corral.Pool(1) as pool:
        job = pool.submit(tasks.sleep, 0.2)
        await bounded(asyncio.gather(pool.close(), pool.close()), timeout=10)
        assert job.result() == 0.2


async def test_terminate_while_close_waits_ends_both() -> None:
    """terminate() during a close() that waits for a long job kills the job and lets the
    close() return too."""
    async with Beacon() as beacon, corral.Pool(1) as pool:
        job = pool.submit(tasks.beacon_then_sleep, beacon.port, 60)
        await beacon.running()
        closing = asyncio.ensure_future(pool.close())
        await asyncio.sleep(0)  # let close() begin waiting
        assert not closing.done()
        await bounded(pool.terminate())
        await bounded(closing, timeout=10)
        assert job.cancelled()


async def test_terminate_while_close_waits_for_queued_jobs_ends_both() -> None:
    """terminate() during a close() that waits for jobs still queued (no worker is up yet
    to hold them) cancels those jobs and lets the close() return too."""
    pool = corral.Pool(1, start_method="spawn")  # spawn: the worker is not up for a while
    job = pool.submit(tasks.add, 1, 2)  # starts the pool; the job waits for the worker
    closing = asyncio.ensure_future(pool.close())
    await asyncio.sleep(0)  # let close() begin waiting
    assert not closing.done()
    await bounded(pool.terminate())
    await bounded(closing, timeout=10)
    assert job.cancelled()


async def test_leaving_async_with_closes_the_pool() -> None:
    """Leaving `async with` closes the pool: jobs submitted inside still finish, and the
    worker processes have exited."""
    async with corral.Pool(2) as pool:
        pids = [w.pid for w in pool.workers]
        job = pool.submit(tasks.sleep, 0.1)
    assert pool.closed
    assert job.result() == 0.1
    assert pool.workers == []
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


# -- start-up ------------------------------------------------------------------------------


async def test_initializer_runs_in_each_worker_before_jobs() -> None:
    """The initializer runs once in each worker with its initargs, before any job."""
    async with corral.Pool(2, initializer=tasks.remember, initargs=("config",)) as pool:
        results = await bounded(asyncio.gather(*(pool.run(tasks.remembered) for _ in range(20))))
        assert all(r == ["config"] for r in results)


@pytest.mark.timeout(30)
async def test_initializer_that_raises_fails_start_quickly() -> None:
    """An initializer that raises makes the pool's start raise WorkerStartupError within a
    few seconds, the initializer's exception its __cause__, instead of retrying forever."""
    started = time.monotonic()
    with pytest.raises(corral.WorkerStartupError) as info:
        async with corral.Pool(2, initializer=tasks.raise_in_initializer, initargs=("bad config",)):
            pytest.fail("the pool started although its initializer raises")
    assert time.monotonic() - started < 10
    cause = info.value.__cause__
    assert isinstance(cause, RuntimeError)
    assert str(cause) == "bad config"


@pytest.mark.timeout(30)
async def test_initializer_failure_leaves_no_process_behind() -> None:
    """When the pool gives up on a raising initializer, start() returns only after the
    failed workers are gone, even one that takes a moment to exit (it left a thread): no
    process or fd outlives the pool."""
    with pytest.raises(corral.WorkerStartupError):
        async with corral.Pool(
            1, initializer=tasks.raise_leaving_a_thread, initargs=("bad config", 0.5)
        ):
            pytest.fail("the pool started although its initializer raises")


async def test_run_after_failed_start_raises_startup_error() -> None:
    """After the pool gave up starting workers, calls raise WorkerStartupError or
    PoolClosedError at once rather than waiting forever."""
    pool = corral.Pool(1, initializer=tasks.raise_in_initializer, initargs=("bad",))
    with pytest.raises(corral.WorkerStartupError):
        await bounded(pool.start())
    with pytest.raises((corral.WorkerStartupError, corral.PoolClosedError)):
        await bounded(pool.run(tasks.add, 1, 2))


# -- leaks over many replacements ----------------------------------------------------------


def _census() -> tuple[int, int]:
    """(child processes of this process at any depth, open fds of this process)."""
    children = len(psutil.Process().children(recursive=True))
    return children, len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("start_method", "deaths"), [("forkserver", 200), ("fork", 50)])
async def test_no_leak_after_many_worker_replacements(start_method: str, deaths: int) -> None:
    """Worker deaths leak no process and no fd: after 200 workers died (their task called
    os._exit) and were replaced, this process has as many children and fds as before, and
    the pool still works.

    The 200 run under forkserver, the default, which (with corral preloaded in the server)
    replaces a worker in about 30 ms, so 200 deaths cost a few seconds; spawn takes 0.2 s
    or more per worker (a minute or more in all) and is left out. A shorter run under fork
    covers the other death fd (a pidfd, where forkserver gives a status pipe)."""
    async with corral.Pool(2, start_method=start_method) as pool:
        assert await bounded(pool.run(tasks.add, 1, 1)) == 2
        before = _census()
        outcomes = await bounded(
            asyncio.gather(
                *(pool.run(tasks.exit_now, 3) for _ in range(deaths)), return_exceptions=True
            ),
            timeout=80,
        )
        assert all(isinstance(o, corral.WorkerLostError) and o.exitcode == 3 for o in outcomes), [
            o for o in outcomes if not isinstance(o, corral.WorkerLostError)
        ][:3]
        await until(lambda: len(pool.workers) == 2)
        await serves_100_calls(pool)
        assert _census() == before
