"""The pool's life cycle under trouble: workers that never come up, retries after a lost
worker, shutdown with jobs in every state, and terminate against a stubborn worker."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

import corral
from corral.workers import LocalWorker
from tests import tasks
from tests.processes import dead, open_fds
from tests.waits import BOUND, bounded, until, wait_until

ROOT = Path(__file__).resolve().parent.parent


def exit_soon_once(marker: str, delay: float) -> None:
    """Initializer: the first worker to run it (the one that creates marker) exits with
    code 0 delay seconds later, after it has announced itself; later ones start normally."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    threading.Timer(delay, os._exit, (0,)).start()


def sigkill_self_the_first_times(directory: str, times: int) -> None:
    """Initializer: the first `times` workers to run it SIGKILL themselves, as another
    process (or the OOM killer) might; later ones start normally."""
    for n in range(times):
        try:
            os.close(os.open(f"{directory}/{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        os.kill(os.getpid(), signal.SIGKILL)


def start_a_child_then_sleep(path: str, seconds: float, deaf: bool = False) -> None:
    """Task: start a process of its own (`sleep 1000`), write its pid to path, then sleep
    (past its hard limit, or until the pool is terminated); deaf: deaf to interrupts."""
    if deaf:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGALRM})
    child = subprocess.Popen(["sleep", "1000"])
    Path(path).write_text(str(child.pid))
    time.sleep(seconds)


@pytest.mark.timeout(60)
async def test_a_worker_that_never_announces_itself_is_killed_and_retried() -> None:
    """An initializer that never returns: each worker is killed at startup_timeout and
    retried with backoff, and after a few tries start() fails with WorkerStartupError
    instead of spinning; nothing is left running."""
    started = time.monotonic()
    pool = corral.Pool(1, initializer=tasks.sleep, initargs=(1000,), startup_timeout=0.5)
    with pytest.raises(corral.WorkerStartupError, match="did not announce itself"):
        await pool.start()
    assert time.monotonic() - started < 30
    with pytest.raises(corral.WorkerStartupError):
        pool.submit(tasks.add, 1, 2)


@pytest.mark.timeout(60)
async def test_retries_run_a_job_again_after_its_worker_is_lost(tmp_path: Path) -> None:
    """A job whose worker dies while running it runs again when it has retries left;
    without them it fails with WorkerLostError carrying the signal."""
    async with corral.Pool(1) as pool:
        marker = str(tmp_path / "retried")
        assert await pool.run(tasks.kill_self_once, marker, retries=1) == "second time lucky"
        with pytest.raises(corral.WorkerLostError) as caught:
            await pool.run(tasks.kill_self_once, str(tmp_path / "not retried"))
        assert caught.value.signal == 9


@pytest.mark.timeout(60)
async def test_close_finishes_jobs_in_every_state() -> None:
    """close() with jobs queued (never sent), written to a worker's pipe (prefetch) and
    running completes every one of them, then stops the workers."""
    pool = corral.Pool(2, strategy="prefetch", prefetch=3)
    await pool.start()
    jobs = [pool.submit(tasks.sleep_then_pid, 0.05) for _ in range(12)]
    await asyncio.sleep(0)  # some running, some in the pipes, the rest queued
    await asyncio.wait_for(pool.close(), 30)
    assert all(job.done() and not job.cancelled() for job in jobs)
    assert len({await job for job in jobs}) == 2


@pytest.mark.timeout(60)
async def test_terminate_does_not_hang_on_a_worker_that_ignores_sigterm() -> None:
    """A worker ignoring SIGTERM in a long task cannot hold terminate() up: it returns at
    once, and the job is cancelled."""
    pool = corral.Pool(1)
    await pool.start()
    job = pool.submit(tasks.ignore_sigterm_and_sleep, 1000)
    (worker,) = pool.workers
    deadline = time.monotonic() + 20
    while worker._page is not None and worker._page.started != job.id:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    started = time.monotonic()
    await asyncio.wait_for(pool.terminate(), 10)
    assert time.monotonic() - started < 5
    assert job.cancelled()


@pytest.mark.timeout(60)
async def test_a_worker_dead_before_start_resumes_is_replaced_not_served(tmp_path: Path) -> None:
    """The first worker announces itself, then exits while the parent's loop is blocked, so
    its UP and its death are handled together before start() resumes: the pool counts it as
    a failed start and starts another, instead of marking the dead worker ready and failing
    every job sent to it."""
    pool = corral.Pool(1, initializer=exit_soon_once, initargs=(str(tmp_path / "once"), 0.3))
    starting = asyncio.create_task(pool.start())
    await until(lambda: any(w.pid for w in pool.stats().workers))
    (first,) = [w.pid for w in pool.stats().workers if w.pid]
    assert first is not None
    wait_until(lambda: dead(first))  # the loop stays blocked until the worker has exited
    try:
        await bounded(starting)
        assert await bounded(pool.run(tasks.pid)) != first
        assert await bounded(pool.run(tasks.add, 1, 2)) == 3
    finally:
        await bounded(pool.close())


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
def test_a_pool_left_open_when_its_loop_ends_leaks_no_fd(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Pools never closed, dropped when their event loop ends: each is collected with a
    ResourceWarning, its workers are killed, and every fd their workers held is closed
    (they stayed open for the life of the process: 5-8 per worker)."""

    async def leave_open() -> None:
        pool = corral.Pool(2)
        await pool.start()
        assert await pool.run(tasks.add, 1, 2) == 3

    before = open_fds()
    with pytest.warns(ResourceWarning, match="never closed"):
        for _ in range(5):
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                runner.run(leave_open())
            gc.collect()
    wait_until(lambda: len(open_fds() - before) == 0, timeout=10)


UNGUARDED = """
import asyncio, sys
sys.path.insert(0, {root!r})
import corral
from tests import tasks

async def main():
    async with corral.Pool(2{options}) as pool:
        print(await pool.run(tasks.add, 1, 2))

asyncio.run(main())
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("options", ["", ', start_method="spawn"'], ids=["default", "spawn"])
def test_a_script_without_the_main_guard_gets_one_clear_error(tmp_path: Path, options: str) -> None:
    """A script that starts a pool at import, without `if __name__ == "__main__":`, ends at
    once with one WorkerStartupError that names the fix, and no worker prints a traceback
    (each printed multiprocessing's, then the pool retried: hundreds of lines)."""
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED.format(root=str(ROOT), options=options))
    done = subprocess.run(
        [sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=BOUND
    )
    assert done.returncode == 1
    assert done.stderr.count("Traceback") == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("corral.WorkerStartupError: a worker failed to start: the main")
    assert 'put the code that starts the pool under `if __name__ == "__main__":`' in last
    assert "bootstrapping" not in done.stderr


async def _grandchild(path: Path) -> int:
    await until(lambda: path.exists() and path.read_text() != "")
    return int(path.read_text())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["time_limit", "cancel", "terminate"])
async def test_a_killed_worker_takes_the_processes_it_started(tmp_path: Path, how: str) -> None:
    """A task starts a process of its own, then its worker is killed: at its hard time
    limit, for ignoring a cancel, or by terminate(). That process goes with the worker
    (it was left running after the limit and after the pool closed)."""
    path = tmp_path / "pid"
    pool = corral.Pool(1)
    try:
        await bounded(pool.start())
        time_limit = 1.0 if how == "time_limit" else None
        deaf = how == "cancel"
        job = pool.submit(start_a_child_then_sleep, str(path), 1000, deaf, time_limit=time_limit)
        grandchild = await _grandchild(path)
        assert not dead(grandchild)
        if how == "time_limit":
            with pytest.raises(corral.TimeLimitExceeded):
                await bounded(job)
        elif how == "cancel":
            job.cancel()  # ignored: the worker is killed after the grace period
        else:
            await bounded(pool.terminate())
        await until(lambda: dead(grandchild), timeout=20)
    finally:
        await bounded(pool.terminate())


@pytest.mark.timeout(60)
async def test_workers_sigkilled_while_starting_do_not_make_the_pool_give_up(
    tmp_path: Path,
) -> None:
    """Five workers in a row SIGKILLed while starting (more than the 3 failed starts after
    which a pool gives up): the pool keeps replacing them and serves, since SIGKILL comes
    from outside the start-up, and chaos killing workers in their first milliseconds must
    not break the pool."""
    pool = corral.Pool(1, initializer=sigkill_self_the_first_times, initargs=(str(tmp_path), 5))
    try:
        await bounded(pool.start())
        assert await bounded(pool.run(tasks.add, 1, 2)) == 3
    finally:
        await bounded(pool.close())


@pytest.mark.timeout(120)
async def test_a_start_up_sigkilled_every_time_gives_up_instead_of_spinning() -> None:
    """An initializer SIGKILLed every time (as the OOM killer ends one that loads too
    much) is retried at once only so often: then the starts count as failures, back off,
    and the pool gives up with WorkerStartupError instead of starting workers forever."""
    pool = corral.Pool(1, initializer=tasks.kill_self)
    try:
        with pytest.raises(corral.WorkerStartupError, match="signal 9"):
            await bounded(pool.start(), timeout=100)
    finally:
        await bounded(pool.close())


class RefusingWorker(LocalWorker):
    """A worker that starts, then refuses every job it is sent."""

    def send(self, job: corral.Job[object]) -> None:
        raise RuntimeError("this worker refuses every job")


@pytest.mark.timeout(60)
async def test_a_worker_refusing_every_job_fails_each_once_without_recursing() -> None:
    """Many calls queued for a worker whose send raises: each fails with that error, in
    turn, without dispatch recursing once per job (it ran into RecursionError, leaving a
    call that never ended)."""
    async with corral.TaskQueue() as queue:
        jobs = [queue.submit(tasks.add, i, 1) for i in range(5000)]
        await bounded(queue.attach(RefusingWorker()))
        outcomes = await bounded(asyncio.gather(*jobs, return_exceptions=True))
        assert all(isinstance(o, RuntimeError) and "refuses" in str(o) for o in outcomes), outcomes[
            :3
        ]
