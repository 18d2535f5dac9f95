"""Logging: each event corral logs is observed here in a test that causes it, with real
processes (a worker that exits or is killed, a hard limit, a cancel ignored, recycling, an
initializer that raises, a broadcast that fails on replay), checking the level, the facts
in the message and the same facts as ``corral_*`` attributes of the record; a successful
call logs nothing; the ``corral`` logger has a ``NullHandler`` and no other handler."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import corral
from corral import _log as log
from corral.workers import ProcessWorker
from tests import tasks
from tests.processes import ROOT, run_python
from tests.waits import bounded, until

MB = 1 << 20

# The facts each event's records carry, besides corral_event.
WORKER = {"corral_worker", "corral_kind", "corral_pid"}
JOB = {"corral_job", "corral_function"}
FACTS = {
    log.WORKER_LOST: WORKER
    | JOB
    | {
        "corral_exitcode",
        "corral_signal",
        "corral_signal_name",
        "corral_started",
        "corral_unstarted",
    },
    log.KILLED_AT_TIME_LIMIT: WORKER | JOB | {"corral_time_limit"},
    log.KILLED_AFTER_CANCEL: WORKER | JOB | {"corral_grace"},
    log.WORKER_RECYCLED: WORKER | {"corral_reason", "corral_limit", "corral_tasks", "corral_rss"},
    log.START_FAILED: WORKER
    | {
        "corral_error",
        "corral_exitcode",
        "corral_signal",
        "corral_signal_name",
        "corral_failures",
        "corral_retry_in",
    },
    log.GAVE_UP: {"corral_error", "corral_attempts"},
    log.REPLAY_FAILED: WORKER | {"corral_function", "corral_error"},
    log.WORKER_STARTED: WORKER,
    log.WORKER_STOPPED: WORKER | {"corral_killed", "corral_tasks"},
}

LEVELS = {
    log.WORKER_LOST: logging.WARNING,
    log.KILLED_AT_TIME_LIMIT: logging.WARNING,
    log.KILLED_AFTER_CANCEL: logging.WARNING,
    log.WORKER_RECYCLED: logging.INFO,
    log.START_FAILED: logging.WARNING,
    log.GAVE_UP: logging.ERROR,
    log.REPLAY_FAILED: logging.WARNING,
    log.WORKER_STARTED: logging.DEBUG,
    log.WORKER_STOPPED: logging.DEBUG,
}


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog, recording every level of the ``corral`` logger."""
    caplog.set_level(logging.DEBUG, logger="corral")
    return caplog


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    """The records of event, in order, each checked for its level, its logger and its
    facts: exactly those the event defines, all prefixed ``corral_``."""
    found = [r for r in caplog.records if getattr(r, "corral_event", None) == event]
    for record in found:
        assert record.name == "corral"
        assert record.levelno == LEVELS[event], record.getMessage()
        facts = {name for name in vars(record) if name.startswith("corral_")}
        assert facts == {"corral_event", *FACTS[event]}
    return found


def corral_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.partition(".")[0] == "corral"]


# -- the logger itself --------------------------------------------------------------------


def test_the_corral_logger_has_only_a_null_handler() -> None:
    """Once the pool's side is loaded, ``corral`` has exactly one handler, a
    ``NullHandler``, and passes its records on to the program's own (propagate)."""
    assert corral.TaskQueue is not None  # loads the queue, and with it the log
    logger = logging.getLogger("corral")
    assert [type(h) for h in logger.handlers] == [logging.NullHandler]
    assert logger.propagate


def test_import_corral_loads_no_logging_and_the_pool_brings_the_null_handler(
    tmp_path: Path,
) -> None:
    """In a fresh interpreter ``import corral`` loads no ``logging`` (every worker process
    imports corral); the first use of the pool loads it, with the ``NullHandler``."""
    done = run_python(
        "-c",
        "import json, sys\n"
        "import corral\n"
        "bare = 'logging' in sys.modules\n"
        "corral.Pool\n"
        "import logging\n"
        "handlers = [type(h).__name__ for h in logging.getLogger('corral').handlers]\n"
        "print(json.dumps([bare, handlers]))\n",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [False, ["NullHandler"]]


LOSE_A_WORKER = """
import asyncio, logging, sys
import corral
from tests import tasks

async def main():
    async with corral.Pool(1) as pool:
        try:
            await pool.run(tasks.exit_now, 3)
        except corral.WorkerLostError:
            print("lost")

if __name__ == "__main__":
    if sys.argv[1:] == ["configured"]:
        logging.basicConfig()
    asyncio.run(main())
"""


@pytest.mark.timeout(90)
def test_a_program_without_logging_set_up_hears_nothing_and_one_with_it_hears_the_loss(
    tmp_path: Path,
) -> None:
    """A script whose worker dies prints nothing on stderr when it has not configured
    logging (the ``NullHandler`` keeps Python's last-resort handler quiet), and the
    warning when it has (``logging.basicConfig``)."""
    (tmp_path / "script.py").write_text(LOSE_A_WORKER)
    quiet = run_python("script.py", cwd=tmp_path)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "lost\n", "")
    told = run_python("script.py", "configured", cwd=tmp_path)
    assert told.returncode == 0, told.stderr
    assert "WARNING:corral:lost worker process-" in told.stderr
    assert "exited with code 3" in told.stderr


# -- a worker lost ------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "death",
    [
        (tasks.exit_now, (3,), 3, None, "exited with code 3"),
        (tasks.kill_self, (), None, signal.SIGKILL, "killed by signal 9 (SIGKILL)"),
    ],
    ids=["exit", "sigkill"],
)
async def test_a_lost_worker_is_logged_with_its_pid_how_it_died_and_its_job(
    logs: pytest.LogCaptureFixture, death: tuple[Callable[..., Any], tuple[Any, ...], Any, Any, str]
) -> None:
    """A worker process that exits (os._exit) or is SIGKILLed while running a job, two
    more sent after it: one WARNING naming the worker, its pid, the exit code or the
    signal and its name, the job it ran (id and function) and the two not yet begun,
    which run on the replacement."""
    fn, args, exitcode, sig, how = death
    async with corral.Pool(1, strategy="prefetch") as pool:
        (worker,) = pool.workers
        pid = await pool.run(tasks.pid)
        doomed = pool.submit(fn, *args)
        after = [pool.submit(tasks.add, i, 1) for i in range(2)]
        with pytest.raises(corral.WorkerLostError):
            await bounded(doomed)
        assert [await bounded(job) for job in after] == [1, 2]
    (record,) = events(logs, log.WORKER_LOST)
    assert record.corral_worker == worker.name
    assert record.corral_kind == "process"
    assert record.corral_pid == pid
    assert record.corral_exitcode == exitcode
    assert record.corral_signal == sig
    assert record.corral_signal_name == (None if sig is None else "SIGKILL")
    assert record.corral_job == doomed.id
    assert record.corral_function == fn.__name__
    assert (record.corral_started, record.corral_unstarted) == (1, 2)
    message = record.getMessage()
    for fact in (worker.name, f"pid {pid}", how, f"job {doomed.id} ({fn.__name__})", "2 jobs"):
        assert fact in message


@pytest.mark.timeout(90)
async def test_a_worker_lost_in_a_chunk_of_map_names_the_mapped_function(
    logs: pytest.LogCaptureFixture,
) -> None:
    """A chunk of ``map`` runs corral's ``call_each`` over the user's function: the loss
    names both, so the operator sees which function was mapped."""
    async with corral.Pool(1) as pool:
        with pytest.raises(corral.WorkerLostError):
            await bounded(pool.map(tasks.exit_now, [4, 4], chunksize=2))
    (record,) = events(logs, log.WORKER_LOST)
    assert record.corral_function == "call_each(exit_now, ...)"
    assert record.corral_exitcode == 4


# -- killed at a limit ------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_hard_time_limit_kill_is_logged_then_the_loss_of_its_worker(
    logs: pytest.LogCaptureFixture,
) -> None:
    """A task past its 0.3 s hard limit: a WARNING names the job, its function, the limit
    and the worker's pid; then the worker's loss, by SIGKILL, is logged too; no record
    calls it an ignored cancel."""
    async with corral.Pool(1) as pool:
        pid = await pool.run(tasks.pid)
        job = pool.submit(tasks.sleep, 1000, time_limit=0.3)
        with pytest.raises(corral.TimeLimitExceeded):
            await bounded(job)
        await until(lambda: bool(events(logs, log.WORKER_LOST)))
    (killed,) = events(logs, log.KILLED_AT_TIME_LIMIT)
    assert killed.corral_time_limit == 0.3
    assert (killed.corral_job, killed.corral_function) == (job.id, "sleep")
    assert killed.corral_pid == pid
    assert "hard time limit of 0.3 s" in killed.getMessage()
    assert f"pid {pid}" in killed.getMessage()
    (lost,) = events(logs, log.WORKER_LOST)
    assert lost.corral_signal_name == "SIGKILL"
    assert lost.corral_job == job.id
    assert logs.records.index(killed) < logs.records.index(lost)
    assert events(logs, log.KILLED_AFTER_CANCEL) == []


def sleep_through_cancels(marker: str, seconds: float) -> None:
    """A task that ignores its interrupt wherever it lands: each ``CancelledError`` raised
    inside it is swallowed, marker touched to say it is running, and it sleeps on."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(asyncio.CancelledError):
            Path(marker).touch()
            time.sleep(max(0.0, deadline - time.monotonic()))


@pytest.mark.timeout(120)
async def test_a_process_ignoring_its_cancel_past_the_grace_is_killed_and_logged(
    logs: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A running task that swallows its interrupt: a grace period after its cancel the
    process is killed, with a WARNING naming the job, the grace and the pid, then the
    loss."""
    marker = tmp_path / "running"
    async with corral.Pool(1) as pool:
        pid = await pool.run(tasks.pid)
        job = pool.submit(sleep_through_cancels, str(marker), 1000)
        await until(marker.exists)
        job.cancel()
        await until(lambda: bool(events(logs, log.WORKER_LOST)))
        assert await pool.run(tasks.pid) != pid
    (killed,) = events(logs, log.KILLED_AFTER_CANCEL)
    assert killed.corral_grace == 1.0  # CANCEL_GRACE
    assert (killed.corral_job, killed.corral_function) == (job.id, "sleep_through_cancels")
    assert killed.corral_pid == pid
    assert "killing its process" in killed.getMessage()
    (lost,) = events(logs, log.WORKER_LOST)
    assert lost.corral_signal_name == "SIGKILL"
    assert logs.records.index(killed) < logs.records.index(lost)


def block_until(release: threading.Event, running: threading.Event) -> str:
    """A call a thread cannot interrupt: it waits in C (a lock) until released, and
    swallows the interrupt should it land between two bytecodes."""
    while not release.is_set():
        with contextlib.suppress(asyncio.CancelledError):
            running.set()
            release.wait(60)
    return "released"


async def swallow_cancel_until(release: asyncio.Event, running: asyncio.Event) -> str:
    """A coroutine that ignores every cancel until released."""
    while not release.is_set():
        with contextlib.suppress(asyncio.CancelledError):
            running.set()
            await release.wait()
    return "released"


def stubborn(kind: str) -> tuple[Callable[..., Any], Any, Any]:
    """The call that ignores its cancel for a worker of kind, and its two events."""
    if kind == "thread":
        return block_until, threading.Event(), threading.Event()
    return swallow_cancel_until, asyncio.Event(), asyncio.Event()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["thread", "local"])
async def test_a_thread_or_task_ignoring_its_cancel_is_abandoned_and_logged(
    logs: pytest.LogCaptureFixture, kind: str
) -> None:
    """A thread worker's call blocked in C, or a loop worker's coroutine that swallows
    its cancellation: a grace period after the cancel the worker gives up on it (a thread
    or task cannot be killed), with a WARNING naming the job and the grace, then the
    loss, which has no pid, exit code or signal."""
    fn, release, running = stubborn(kind)
    try:
        async with corral.Pool(1, kind=kind) as pool:  # type: ignore[arg-type]
            (worker,) = pool.workers
            job = pool.submit(fn, release, running)
            await until(running.is_set)
            job.cancel()
            await until(lambda: bool(events(logs, log.WORKER_LOST)))
    finally:
        release.set()
    (killed,) = events(logs, log.KILLED_AFTER_CANCEL)
    assert (killed.corral_worker, killed.corral_kind) == (worker.name, kind)
    assert (killed.corral_job, killed.corral_grace) == (job.id, 1.0)
    assert killed.corral_pid is None
    assert "abandoning its" in killed.getMessage()
    (lost,) = events(logs, log.WORKER_LOST)
    assert (lost.corral_pid, lost.corral_exitcode, lost.corral_signal) == (None, None, None)
    assert "still running 1 s after it was cancelled" in lost.getMessage()
    assert logs.records.index(killed) < logs.records.index(lost)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["thread", "local"])
async def test_a_hard_limit_on_a_thread_or_task_is_logged_as_the_limit_only(
    logs: pytest.LogCaptureFixture, kind: str
) -> None:
    """A thread or loop worker's call past its hard limit is given up at once: the
    limit's WARNING and the loss, and no record of an ignored cancel (it had no grace)."""
    fn, release, running = stubborn(kind)
    try:
        async with corral.Pool(1, kind=kind) as pool:  # type: ignore[arg-type]
            job = pool.submit(fn, release, running, time_limit=0.3)
            with pytest.raises(corral.TimeLimitExceeded):
                await bounded(job)
            await until(lambda: bool(events(logs, log.WORKER_LOST)))
    finally:
        release.set()
    (killed,) = events(logs, log.KILLED_AT_TIME_LIMIT)
    assert (killed.corral_kind, killed.corral_job) == (kind, job.id)
    assert events(logs, log.KILLED_AFTER_CANCEL) == []


# -- recycled -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_worker_recycled_at_its_task_quota_is_logged_at_info(
    logs: pytest.LogCaptureFixture,
) -> None:
    """max_tasks_per_child=2: at its second job the worker is recycled (INFO, with the
    option, its value, the jobs sent and the pid); it stops (DEBUG) and its replacement,
    whose start is logged, runs the third call."""
    async with corral.Pool(1, max_tasks_per_child=2) as pool:
        (worker,) = pool.workers
        first = await pool.run(tasks.pid)
        assert await pool.run(tasks.pid) == first
        third = await pool.run(tasks.pid)
        assert third != first
        await until(lambda: bool(events(logs, log.WORKER_STOPPED)))
        (recycled,) = events(logs, log.WORKER_RECYCLED)
        assert recycled.corral_worker == worker.name
        assert recycled.corral_pid == first
        assert recycled.corral_reason == "max_tasks_per_child"
        assert (recycled.corral_limit, recycled.corral_tasks) == (2, 2)
        assert recycled.corral_rss is None
        assert "max_tasks_per_child=2" in recycled.getMessage()
        (stopped,) = events(logs, log.WORKER_STOPPED)
        assert (stopped.corral_pid, stopped.corral_tasks) == (first, 2)
        started = [r.corral_pid for r in events(logs, log.WORKER_STARTED)]
        assert started == [first, third]


@pytest.mark.timeout(90)
async def test_a_worker_recycled_above_its_memory_limit_is_logged_with_its_rss(
    logs: pytest.LogCaptureFixture,
) -> None:
    """A task that leaks 50 MB pushes its worker over max_memory_per_child: INFO with the
    limit and the worker's resident memory, above it."""
    async with corral.Pool(1) as probe:
        base = await probe.run(tasks.rss)
    limit = base + 30 * MB
    async with corral.Pool(1, max_memory_per_child=limit) as pool:
        pid = await pool.run(tasks.leak, 50)
        assert await pool.run(tasks.pid) != pid
    (recycled,) = events(logs, log.WORKER_RECYCLED)
    assert recycled.corral_reason == "max_memory_per_child"
    assert recycled.corral_limit == limit
    assert recycled.corral_rss > limit
    assert recycled.corral_pid == pid
    assert "above max_memory_per_child" in recycled.getMessage()


# -- start-up failures ----------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("initializer", "initargs", "exitcode", "said"),
    [
        (tasks.raise_in_initializer, ("no database",), None, "RuntimeError: no database"),
        (tasks.exit_now, (5,), 5, "exited with code 5"),
    ],
)
async def test_failed_starts_are_logged_with_the_back_off_then_the_give_up(
    logs: pytest.LogCaptureFixture,
    initializer: Callable[..., Any],
    initargs: tuple[Any, ...],
    exitcode: int | None,
    said: str,
) -> None:
    """An initializer that raises (or exits) every time: two WARNINGs, each with the
    reason, the process's pid and exit code, the failures so far and the back-off (0.1 s,
    then 0.2 s); then one ERROR: the pool gives up after 3 attempts."""
    pool = corral.Pool(1, initializer=initializer, initargs=initargs)
    with pytest.raises(corral.WorkerStartupError):
        async with pool:
            pass
    failed = events(logs, log.START_FAILED)
    assert [(r.corral_failures, r.corral_retry_in) for r in failed] == [(1, 0.1), (2, 0.2)]
    pids = {r.corral_pid for r in failed}
    assert len(pids) == 2 and None not in pids  # two processes tried
    for record in failed:
        assert record.corral_exitcode == exitcode
        assert said in record.corral_error
        assert said in record.getMessage()
    assert "retrying in 0.1 s" in failed[0].getMessage()
    (gave_up,) = events(logs, log.GAVE_UP)
    assert gave_up.corral_attempts == 3
    assert said in gave_up.corral_error
    assert "3 times in a row" in gave_up.getMessage()
    assert logs.records.index(failed[-1]) < logs.records.index(gave_up)


@pytest.mark.timeout(60)
async def test_an_attached_worker_that_fails_to_start_is_logged_not_retried(
    logs: pytest.LogCaptureFixture,
) -> None:
    """A process worker the caller attached, whose initializer raises: attach's task
    raises, and one WARNING says it is not retried (the queue does not own it)."""
    async with corral.TaskQueue() as queue:
        worker = ProcessWorker(initializer=tasks.raise_in_initializer, initargs=("bad",))
        with pytest.raises(corral.WorkerStartupError):
            await bounded(queue.attach(worker))
    (failed,) = events(logs, log.START_FAILED)
    assert failed.corral_worker == worker.name
    assert failed.corral_retry_in is None
    assert "not retried" in failed.getMessage()
    assert events(logs, log.GAVE_UP) == []


@pytest.mark.timeout(120)
async def test_a_broadcast_failing_on_replay_is_logged(
    logs: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A broadcast that wrote to a directory since removed raises when a replacement
    replays it: a WARNING names the function, the error and the new worker's pid; the
    replacement's start fails, and after its retries the pool gives up."""
    where = tmp_path / "state"
    where.mkdir()
    async with corral.Pool(1) as pool:
        await pool.broadcast(tasks.append_line, str(where / "log"), "set up")
        shutil.rmtree(where)
        with pytest.raises(corral.WorkerLostError):
            await bounded(pool.run(tasks.kill_self))
        await until(lambda: bool(events(logs, log.GAVE_UP)))
        with pytest.raises(corral.WorkerStartupError):
            await pool.run(tasks.pid)
    replays = events(logs, log.REPLAY_FAILED)
    assert len(replays) == 3
    for record in replays:
        assert record.corral_function == "append_line"
        assert record.corral_error.startswith("FileNotFoundError")
        assert record.corral_pid is not None
        assert "broadcast append_line, replayed on worker" in record.getMessage()
    assert len(events(logs, log.START_FAILED)) == 2


# -- worker start and stop; nothing per call -----------------------------------------------


@pytest.mark.timeout(60)
async def test_workers_starting_and_stopping_are_logged_at_debug(
    logs: pytest.LogCaptureFixture,
) -> None:
    """Two workers: each start is a DEBUG record with its pid; closing stops both (DEBUG,
    not killed, with the jobs each ran); terminating a pool logs its worker killed."""
    async with corral.Pool(2) as pool:
        pids = {w.pid for w in pool.workers}
        await pool.run(tasks.add, 1, 1)
    assert {r.corral_pid for r in events(logs, log.WORKER_STARTED)} == pids
    stopped = events(logs, log.WORKER_STOPPED)
    assert {r.corral_pid for r in stopped} == pids
    assert {r.corral_killed for r in stopped} == {False}
    assert sum(r.corral_tasks for r in stopped) == 1
    logs.clear()
    pool = corral.Pool(1)
    async with pool:
        await pool.terminate()
    (killed,) = events(logs, log.WORKER_STOPPED)
    assert killed.corral_killed is True
    assert "was killed" in killed.getMessage()
    assert events(logs, log.WORKER_LOST) == []  # terminating is no loss


@pytest.mark.timeout(60)
async def test_successful_calls_log_nothing(logs: pytest.LogCaptureFixture) -> None:
    """With every level of ``corral`` enabled, a started pool's calls (run, submit, map,
    imap, iterate, broadcast) make no record at all."""
    async with corral.Pool(2) as pool:
        logs.clear()
        assert await pool.run(tasks.add, 1, 2) == 3
        assert await asyncio.gather(*(pool.submit(tasks.square, i) for i in range(50))) == [
            i * i for i in range(50)
        ]
        assert await pool.map(tasks.square, range(100)) == [i * i for i in range(100)]
        assert [x async for x in pool.imap(tasks.square, range(10))] == [i * i for i in range(10)]
        assert [x async for x in pool.iterate(tasks.count_up, 5)] == list(range(5))
        await pool.broadcast(tasks.set_state, "key", 1)
        assert corral_records(logs) == []


def test_every_event_is_documented() -> None:
    """docs/logging.md names every event and every fact a record may carry."""
    page = (ROOT / "docs" / "logging.md").read_text()
    for event in log.EVENTS:
        assert f"`{event}`" in page
    for fact in set().union(*FACTS.values()):
        assert f"`{fact}`" in page
