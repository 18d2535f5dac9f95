"""The ``Worker`` contract (``corral.workers._base``), one suite for every kind:
``LocalWorker`` (jobs run in the event loop), ``ThreadWorker`` (a thread of its own),
``ProcessWorker`` (a child process, by fork, forkserver and spawn) and ``DaskWorker`` (the
threads of a ``distributed.LocalCluster``), each driven by the recording host of
``tests.hosts`` and through a ``TaskQueue``.

Each test runs once per kind and says what every worker must do. Where a kind must be
driven its own way (a call that blocks is a coroutine in the loop and a plain call
elsewhere; a call in another process signals through files), the ``Kind`` says how.
Where a kind cannot keep a contract item, ``Kind.cannot`` says which and why, and the test
is an expected failure (strict: it must fail) or, where failing would cost a long wait or
be left to chance, a skip with that reason. What is true of one kind alone stays in its
own file (``test_local_worker.py``, ``test_thread_worker.py``,
``test_process_worker.py``, ``test_dask_worker.py``).

spawn starts a fresh interpreter per worker (a second or more on a loaded machine): it
runs only the tests marked ``key``; fork and forkserver run them all."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

import corral
from corral import Job, JobState
from corral.workers import DaskWorker, LocalWorker, ProcessWorker, ThreadWorker, Worker
from tests import processes, tasks, waits
from tests.hosts import BOUND, Host, send, started

F = TypeVar("F", bound=Callable[..., Any])


def key(test: F) -> F:
    """Mark a test that the key_only kinds (spawn) run too."""
    test.key = True  # type: ignore[attr-defined]
    return test


# -- signals that cross threads and processes ------------------------------------------------


@dataclass(frozen=True)
class FileEvent:
    """``threading.Event``'s ``set``, ``is_set`` and ``wait``, kept in a file, so a call
    in another process (a child, a Dask worker) and the test can share it."""

    path: str

    def set(self) -> None:
        Path(self.path).touch()

    def is_set(self) -> bool:
        return os.path.exists(self.path)

    def wait(self, timeout: float) -> bool:
        """Poll (every 2 ms; a sleep a process's interrupt lands in) until set."""
        deadline = time.monotonic() + timeout
        while not self.is_set():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True


@dataclass(frozen=True)
class FileLog:
    """A list's ``append`` and iteration, kept in a file, one line an entry."""

    path: str

    def append(self, entry: object) -> None:
        with open(self.path, "a") as file:
            file.write(f"{entry}\n")

    def __iter__(self) -> Iterator[str]:
        with contextlib.suppress(FileNotFoundError), open(self.path) as file:
            return iter(file.read().splitlines())
        return iter(())


# An event a call and the test share: an asyncio.Event for a call in the loop, a
# threading.Event for one in another thread, a FileEvent for one in another process.
Event = asyncio.Event | threading.Event | FileEvent
Log = list[Any] | FileLog


@dataclass(frozen=True)
class Kind:
    """A kind of worker, and what its contract tests must do differently for it."""

    name: str
    make: Callable[..., Worker]  # make(initializer=..., initargs=..., series=...)
    event: Callable[[], Event]  # the events its calls can set and wait for
    log: Callable[[], Log]  # a list its calls can append to
    # (running, release): sets running, then waits for release. A thread's call waits
    # blocked in C, where no interrupt lands; a loop's coroutine can only be cancelled.
    block: Callable[..., object]
    # (running, release): sets running, then waits for release; a cancel stops it at once.
    interruptible: Callable[..., object]
    # (running, release, caught): sets running, then waits for release, noting each
    # CancelledError it swallows in caught.
    stubborn: Callable[..., object]
    # The name of the thread the worker's calls run in; None: a thread it does not name.
    thread: Callable[[Worker], str | None]
    # Giving up on a running call cancels it once more: a task can be cancelled again,
    # while a thread's call gets one interrupt of each kind, and a process is killed.
    give_up_cancels_again: bool = False
    # kill() closes open streams before it returns: the loop closes them itself, while a
    # busy thread closes them once it exits, and kill() does not wait for that.
    kill_closes_streams: bool = False
    remote: bool = False  # calls run in another process: errors carry RemoteTraceback
    # job_started comes for every job; else only for one with a hard time limit (which
    # the host times from it), as a process child acknowledges only those.
    reports_every_start: bool = True
    # may_have_started says False for a job queued behind the one it runs.
    tells_unstarted: bool = False
    # Contract items it cannot keep (the test of each names it), and why: the test is
    # an expected failure.
    cannot: Mapping[str, str] = field(default_factory=dict)
    # Contract items it has nothing to test with, or whose failure would cost a long wait
    # (or, on Python 3.11.7, crash pytest's report of it): the test is skipped.
    skips: Mapping[str, str] = field(default_factory=dict)
    # Its calls can be handed a coroutine that sleeps long in C (asyncio.sleep): an
    # interrupt or a soft limit reaches it there.
    sleeps_in_c: bool = True
    key_only: bool = False  # runs only the tests marked key
    library_threads: tuple[str, ...] = ()  # prefixes of threads its library keeps
    pid: Callable[[Worker], int | None] = lambda worker: None


def unable(request: pytest.FixtureRequest, kind: Kind, item: str) -> None:
    """Mark the test an expected failure (strict) where kind cannot keep item."""
    reason = kind.cannot.get(item)
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{kind.name}: {reason}"))


def lacks(kind: Kind, item: str) -> None:
    """Skip the test, with the reason, where kind skips item."""
    reason = kind.skips.get(item)
    if reason is not None:
        pytest.skip(f"{kind.name}: {reason}")


# -- calls for each kind ---------------------------------------------------------------


async def wait_until(running: asyncio.Event, release: asyncio.Event) -> str:
    """Sets running, then waits for release."""
    running.set()
    await release.wait()
    return "released"


async def stubborn_coroutine(
    running: asyncio.Event, release: asyncio.Event, caught: list[str]
) -> str:
    """Waits for release, swallowing every cancellation."""
    while not release.is_set():
        try:
            running.set()
            await release.wait()
        except asyncio.CancelledError:
            caught.append("cancelled")
    return "released"


def block(running: threading.Event | FileEvent, release: threading.Event | FileEvent) -> str:
    """Sets running, then waits (bounded) for release: blocked in C in a thread (a
    process's interrupt lands in the sleeps of a FileEvent's wait)."""
    running.set()
    release.wait(BOUND)
    return "released"


def spin(running: threading.Event | FileEvent, release: threading.Event | FileEvent) -> str:
    """Busy in Python bytecode (so an interrupt lands at once) until released (BOUND s at
    most: a lost interrupt must not leave a thread spinning into later tests)."""
    running.set()
    deadline = time.monotonic() + BOUND
    while not release.is_set() and time.monotonic() < deadline:
        pass
    return "released"


def stubborn_call(
    running: threading.Event | FileEvent, release: threading.Event | FileEvent, caught: Log
) -> str:
    """Spins, swallowing every CancelledError, until released (BOUND s at most)."""
    deadline = time.monotonic() + BOUND
    while not release.is_set() and time.monotonic() < deadline:
        try:
            running.set()
            while not release.is_set() and time.monotonic() < deadline:
                pass
        except asyncio.CancelledError:
            caught.append("cancelled")
    return "released"


async def nap(seconds: float) -> float:
    """A coroutine that sleeps in short steps, back in Python every 5 ms: an asynchronous
    exception (a Dask thread's soft limit) reaches it there."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    return seconds


def sleeper(kind: Kind) -> Callable[[float], Any]:
    """A coroutine function that sleeps long, where a cancel or soft limit reaches it."""
    return asyncio.sleep if kind.sleeps_in_c else nap


def waiting_coroutine(kind: Kind, release: Event) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """A coroutine call that waits long: in a sleep, where the kind can interrupt one,
    else until release (a call Dask cannot stop must not hold its thread for long)."""
    if kind.sleeps_in_c:
        return asyncio.sleep, (BOUND,)
    return until_released, (kind.event(), release)


# -- the kinds -----------------------------------------------------------------------------


def main_thread(worker: Worker) -> str:
    return "MainThread"


LOCAL = Kind(
    name="local",
    make=LocalWorker,
    event=asyncio.Event,
    log=list,
    block=wait_until,
    interruptible=wait_until,
    stubborn=stubborn_coroutine,
    thread=lambda worker: threading.current_thread().name,  # the loop's, where tests run
    give_up_cancels_again=True,
    kill_closes_streams=True,
)

THREAD = Kind(
    name="thread",
    make=ThreadWorker,
    event=threading.Event,
    log=list,
    block=block,
    interruptible=spin,
    stubborn=stubborn_call,
    thread=lambda worker: f"corral-{worker.name}",
    cannot={
        "interrupt_in_c": "an interrupt reaches a thread only in Python bytecode: a call "
        "blocked in C is given up on after the grace period, and the worker with it",
    },
)

NO_STATE = (
    "it reads no job state: cancel() is the host's only word (a job CANCELLED without a "
    "cancel runs)"
)
KILLED_RUNS_NO_FINALLY = (
    "SIGKILL ends the process at once: a killed worker's open generators never close"
)


def process_kind(start_method: str) -> Kind:
    return Kind(
        name=f"process-{start_method}",
        make=functools.partial(ProcessWorker, start_method=start_method),
        event=threading.Event,  # replaced by FileEvents in the kind fixture
        log=list,
        block=block,
        interruptible=spin,
        stubborn=stubborn_call,
        thread=main_thread,
        remote=True,
        reports_every_start=False,
        tells_unstarted=True,
        cannot={
            "reads_state": NO_STATE,
            "kill_closes_streams": KILLED_RUNS_NO_FINALLY,
            "async_initializer": "the child calls the initializer and does not await what it "
            "returns (a coroutine is never awaited)",
            "soft_limit_cancels": "a soft limit is SoftTimeLimitExceeded raised inside the "
            "call, a coroutine's too: a coroutine that handles CancelledError does not see it",
            "free_unstarted_at_once": "a cancelled job already in the child's pipe is "
            "skipped when the child comes to it: job_done comes after the busy job's",
        },
        key_only=start_method == "spawn",
        pid=lambda worker: worker.pid,
    )


DASK_CANNOT_STOP = (
    "Dask cannot interrupt a running thread, nor end it: cancel() releases the job at "
    "once (job_done with CancelledError) and the call runs on in its thread; the worker "
    "lives on"
)
# slots=1: one task on the cluster at a time, the jobs sent behind it waiting here in order,
# as in the other kinds (without it, Dask runs the jobs a worker holds side by side).
DASK = Kind(
    name="dask",
    make=DaskWorker,  # given the cluster's address (and slots=1) in the kind fixture
    event=threading.Event,
    log=list,
    block=block,
    interruptible=spin,
    stubborn=stubborn_call,
    thread=lambda worker: None,
    remote=True,
    reports_every_start=False,
    sleeps_in_c=False,
    library_threads=("Dask-", "TCP-Executor", "IO loop", "Profile"),
    cannot={
        "soft_limit_cancels": "a soft limit is SoftTimeLimitExceeded raised inside the call "
        "(an asynchronous exception in its thread), a coroutine's too",
        "reads_state": NO_STATE,
        "interrupt": DASK_CANNOT_STOP,  # what its cancel does test_dask_worker.py proves
    },
    skips={
        "initializer": "a DaskWorker takes no initializer: the cluster's workers are set "
        "up by Dask (preload scripts, Client.register_plugin)",
        "give_up": DASK_CANNOT_STOP,
        "stop_with_streams": "stop() waits for every held job, an open stream included, "
        "which only its consumer or a cancel ends",
    },
)

KINDS = [LOCAL, THREAD, *(process_kind(m) for m in ("fork", "forkserver", "spawn")), DASK]


@pytest.fixture(scope="module")
def cluster_address() -> Iterator[str]:
    """A LocalCluster on loopback: one worker process with two threads (one left free
    while a test's call that Dask cannot stop holds the other)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0"
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(params=KINDS, ids=lambda kind: kind.name)
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Kind:
    """The kind of worker a contract test runs on; a kind whose calls run in another
    process signals through files in the test's tmp_path."""
    result: Kind = request.param
    if result.key_only and not getattr(request.function, "key", False):
        pytest.skip(f"{result.name}: only the key tests (a fresh interpreter per worker)")
    if result is DASK:
        address = request.getfixturevalue("cluster_address")
        result = dataclasses.replace(result, make=functools.partial(DaskWorker, address, slots=1))
    if result.remote:
        names = (str(tmp_path / f"{i}") for i in itertools.count())
        result = dataclasses.replace(
            result,
            event=lambda: FileEvent(next(names)),
            log=lambda: FileLog(next(names)),
        )
    return result


@pytest.fixture(autouse=True)
def no_leaks(kind: Kind) -> Iterator[None]:
    """The suite's leak check (``tests.processes.no_leaks``), after the kind is made, so
    that the module's cluster is counted before."""
    with processes.no_leaks():
        yield


# -- helpers ---------------------------------------------------------------------------


async def wait_for(event: Event) -> None:
    """Wait (bounded) for an event without blocking the loop."""
    if isinstance(event, asyncio.Event):
        await waits.bounded(event.wait(), BOUND)
    elif isinstance(event, FileEvent):
        await waits.until(event.is_set, BOUND)
    else:
        assert await asyncio.to_thread(event.wait, BOUND)


async def settle(kind: Kind, worker: Worker) -> None:
    """Wait (bounded) for the worker's own thread, where it has one, to end; then let the
    loop run what that thread posted, or what an abandoned task does, before checking."""
    name = kind.thread(worker)
    for thread in threading.enumerate():
        if thread.name == name and thread is not threading.current_thread():
            await asyncio.to_thread(thread.join, BOUND)
            assert not thread.is_alive()
    for _ in range(5):
        await asyncio.sleep(0)


def new_threads(kind: Kind, before: set[threading.Thread]) -> list[str]:
    """The names of the threads alive now that were not in before (less those its
    library keeps for the process's life)."""
    return sorted(
        thread.name
        for thread in threading.enumerate()
        if thread not in before and not thread.name.startswith(kind.library_threads)
    )


def acked(kind: Kind, job: Job[Any]) -> Job[Any]:
    """job, given a hard time limit where the kind reports job_started only for such a
    job (the host times the limit from it; this host arms nothing)."""
    if not kind.reports_every_start:
        job.time_limit = 10 * BOUND
    return job


async def loss_or_outcome(host: Host, job: Job[Any]) -> str:
    """Wait (bounded) for whichever comes first of the worker's loss and job's outcome."""
    lost, done = host.lost, host.outcomes[job.id]  # asyncio.wait leaves them as they are
    await asyncio.wait((lost, done), timeout=BOUND, return_when=asyncio.FIRST_COMPLETED)
    assert lost.done() or done.done()
    return "lost" if lost.done() else "done"


# -- tasks for every kind ----------------------------------------------------------------


def whoami() -> str:
    return threading.current_thread().name


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


async def async_fail(message: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


async def until_released(running: Event, release: Event) -> str:
    """Sets running, then waits in steps of 5 ms (back in Python between them, where an
    asynchronous exception lands) for release (BOUND s at most)."""
    running.set()
    deadline = time.monotonic() + BOUND
    while not release.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    return "released"


async def handle_cancel(running: Event, release: Event) -> str:
    """Waits for release (until_released); returns "handled" when cancelled."""
    try:
        await until_released(running, release)
    except asyncio.CancelledError:
        return "handled"
    return "released"


async def record_coroutine(log: Log, i: int) -> int:
    log.append(f"in {i}")
    await asyncio.sleep(0.001)
    log.append(f"out {i}")
    return i


def record_call(log: Log, i: int) -> int:
    log.append(f"in {i}")
    time.sleep(0.002)
    log.append(f"out {i}")
    return i


def note_where(log: Log, tag: str) -> None:
    log.append(tag + whoami())


async def async_note_where(log: Log, tag: str) -> None:
    await asyncio.sleep(0)
    log.append(tag + whoami())


def counting(produced: Log, closed: Event, where: Log) -> Iterator[int]:
    """Yield 0, 1, 2, ... forever, noting each in produced; note the thread it ends in."""
    try:
        for i in itertools.count():
            produced.append(i)
            yield i
    finally:
        where.append(threading.current_thread().name)
        closed.set()


async def async_report_each(n: int) -> str:
    for i in range(n):
        corral.report(i)
        await asyncio.sleep(0)
    return "finished"


# -- tests -------------------------------------------------------------------------------


@key
async def test_values_and_exceptions_come_back(kind: Kind) -> None:
    """Values and exceptions of plain calls and of coroutines come back through job_done,
    the exception as its own type with its message: unwrapped with its own traceback from
    a call in this process, with the worker's traceback (``RemoteTraceback``) as its cause
    from another; job_started, when reported, comes first (every kind reports it for a
    job with a hard time limit); every callback is made in the loop's thread; the calls
    run in the kind's thread (or another process), and once stop() returns no thread of
    the worker is left."""
    before = set(threading.enumerate())
    host = Host()
    worker = await started(kind.make(), host)
    try:
        assert worker.alive
        assert worker.pid == kind.pid(worker)
        assert worker.pid != os.getpid()
        jobs = [
            host.job(tasks.add, 2, 3),
            host.job(tasks.fail, "plain"),
            host.job(async_add, 4, 5),
            host.job(async_fail, "async"),
            host.job(whoami),
            host.job(tasks.pid),
        ]
        for job in jobs:
            worker.send(acked(kind, job))
        assert await host.outcome(jobs[0]) == (5, None)
        assert await host.outcome(jobs[2]) == (9, None)
        for job, message in ((jobs[1], "plain"), (jobs[3], "async")):
            value, error = await host.outcome(job)
            assert value is None
            assert isinstance(error, ValueError)
            assert str(error) == message
            if kind.remote:
                assert isinstance(error.__cause__, corral.RemoteTraceback)
                assert "Traceback" in error.__cause__.tb
            else:
                assert error.__cause__ is None
                assert error.__traceback__ is not None
                if job is jobs[1]:
                    assert error.__traceback__.tb_next is not None  # tasks.fail()'s frame
        thread = kind.thread(worker)
        if thread is not None:
            assert await host.outcome(jobs[4]) == (thread, None)
        pid, _ = await host.outcome(jobs[5])
        assert (pid != os.getpid()) is kind.remote
        for job in jobs:  # (those of a kind that runs several at once interleave)
            mine = [event for event in host.events if event[1] == job.id]
            assert mine == [("started", job.id), ("done", job.id)]
    finally:
        await worker.stop()
    assert not worker.alive
    assert new_threads(kind, before) == []


async def test_job_started_comes_for_every_job_where_the_kind_says_so(kind: Kind) -> None:
    """A job with no hard time limit: kinds that run it in this process report
    job_started before job_done; the others may leave it out, never report it after."""
    host = Host()
    worker = await started(kind.make(), host)
    try:
        job = send(worker, host.job(tasks.add, 1, 1))
        assert await host.outcome(job) == (2, None)
        mine = [event for event in host.events if event[1] == job.id]
        if kind.reports_every_start:
            assert mine == [("started", job.id), ("done", job.id)]
        else:
            assert mine in ([("started", job.id), ("done", job.id)], [("done", job.id)])
    finally:
        await worker.stop()


async def test_send_never_blocks_and_jobs_run_one_at_a_time_in_order(kind: Kind) -> None:
    """send() returns while the worker is busy; the jobs sent run afterwards, one after
    another, in order, never two at once: coroutines and plain calls alike."""
    host = Host()
    worker = await started(kind.make(), host)
    running, release = kind.event(), kind.event()
    log = kind.log()
    try:
        send(worker, host.job(kind.block, running, release))
        await wait_for(running)
        jobs = [host.job(record_coroutine, log, i) for i in range(5)]
        jobs += [host.job(record_call, log, i) for i in range(5, 10)]
        for job in jobs:
            worker.send(job)
        assert not list(log)  # queued behind the busy call
        release.set()
        assert [(await host.outcome(job))[0] for job in jobs] == list(range(10))
        assert list(log) == [f"{step} {i}" for i in range(10) for step in ("in", "out")]
    finally:
        release.set()
        await worker.stop()


@pytest.mark.parametrize("initializer", [note_where, async_note_where], ids=["plain", "async"])
async def test_initializer_runs_first_where_the_calls_run(
    request: Any, kind: Kind, initializer: Callable[..., Any]
) -> None:
    """The initializer runs at start, before any job, in the thread the calls run in; one
    that returns an awaitable is awaited."""
    lacks(kind, "initializer")
    if initializer is async_note_where:
        unable(request, kind, "async_initializer")
    host = Host()
    seen = kind.log()
    worker = await started(kind.make(initializer=initializer, initargs=(seen, "ready in ")), host)
    try:
        assert list(seen) == [f"ready in {kind.thread(worker)}"]
        assert await host.outcome(send(worker, host.job(tasks.add, 1, 1))) == (2, None)
    finally:
        await worker.stop()


@key
async def test_a_raising_initializer_fails_start_and_leaves_nothing(kind: Kind) -> None:
    """start() raises WorkerStartupError naming the initializer's error, which is its
    cause; no thread of the worker is left when it raises, no loss is reported, and the
    worker is dead and cannot be started again."""
    lacks(kind, "initializer")
    before = set(threading.enumerate())
    host = Host()
    worker = kind.make(initializer=tasks.fail, initargs=("no config",))
    with pytest.raises(corral.WorkerStartupError, match="ValueError: no config") as caught:
        async with asyncio.timeout(BOUND):
            await worker.start(host)
    assert isinstance(caught.value.__cause__, ValueError)
    assert not worker.alive
    assert new_threads(kind, before) == []
    with pytest.raises(RuntimeError, match="cannot start"):
        await worker.start(host)
    await worker.stop()  # nothing to do
    assert not host.lost.done()


async def test_bad_arguments_and_lifecycle_errors(kind: Kind) -> None:
    """A non-callable initializer is refused at the call; a worker starts once; stop and
    kill on a worker never started return; stop is idempotent; a stopped worker refuses
    jobs."""
    if "initializer" not in kind.skips:
        for initializer in ("setup", 42):
            with pytest.raises(TypeError, match="initializer must be callable"):
                kind.make(initializer=initializer)
    await kind.make().stop()
    await kind.make().kill()
    host = Host()
    worker = await started(kind.make(), host)
    with pytest.raises(RuntimeError, match="cannot start"):
        await worker.start(host)
    await worker.stop()
    await worker.stop()
    with pytest.raises(RuntimeError, match="cannot send"):
        worker.send(host.job(tasks.add, 1, 2))


async def test_a_worker_serves_the_series_it_names(kind: Kind) -> None:
    """A worker made with series serves jobs of those series and of none; one made
    without serves every series."""
    gpu = kind.make(series=["gpu", "big"])
    assert gpu.series == frozenset({"gpu", "big"})
    assert [gpu.serves(s) for s in ("gpu", "big", None, "cpu")] == [True, True, True, False]
    assert kind.make().serves("anything")


async def test_series_given_as_one_string_is_refused_leaving_nothing(
    request: Any, kind: Kind
) -> None:
    """series="gpu" (a string, which would be a set of letters) is refused at the call
    with the fix in the message, and the half-made worker leaves nothing behind (no
    error from its finalizer)."""
    unable(request, kind, "construct_half")
    with pytest.raises(TypeError, match="write series=\\['gpu'\\]"):
        kind.make(series="gpu")
    gc.collect()  # a half-made worker's __del__ runs now, in this test


async def test_soft_limit_stops_a_coroutine(kind: Kind) -> None:
    """At its soft limit a coroutine is stopped: the caller gets SoftTimeLimitExceeded
    with the limit (in this process caused by the task's cancellation), not before the
    limit; the worker serves on."""
    host = Host()
    worker = await started(kind.make(), host)
    try:
        slow = send(worker, host.job(sleeper(kind), BOUND, soft=0.05))
        _, error = await host.outcome(slow)
        assert type(error) is corral.SoftTimeLimitExceeded
        assert error.limit == 0.05
        if not kind.remote:
            assert isinstance(error.__cause__, asyncio.CancelledError)
        # Not before the limit (uvloop's timers count whole ms: up to 1 ms early).
        assert 0.05 - 0.002 <= (host.run_times[slow.id] or 0) < BOUND
        assert await host.outcome(send(worker, host.job(tasks.add, 1, 1))) == (2, None)
        assert worker.alive
    finally:
        await worker.stop()


async def test_soft_limit_is_a_cancellation_a_coroutine_may_handle(
    request: Any, kind: Kind
) -> None:
    """At its soft limit a coroutine's task is cancelled: one that handles the
    CancelledError and returns gives its value."""
    unable(request, kind, "soft_limit_cancels")
    host = Host()
    worker = await started(kind.make(), host)
    try:
        handled = send(worker, host.job(handle_cancel, kind.event(), kind.event(), soft=0.05))
        assert await host.outcome(handled) == ("handled", None)
    finally:
        await worker.stop()


@key
async def test_cancel_a_job_not_started(request: Any, kind: Kind) -> None:
    """A job cancelled while queued behind a busy one never runs and has no run_time;
    it is reported through job_done with CancelledError, freeing its slot while the busy
    job still runs; the job after it runs."""
    unable(request, kind, "free_unstarted_at_once")
    host = Host()
    worker = await started(kind.make(), host)
    running, release = kind.event(), kind.event()
    ran = kind.log()
    try:
        busy = host.job(kind.block, running, release)
        queued, last = host.job(ran.append, "queued"), host.job(ran.append, "last")
        for job in (busy, queued, last):
            worker.send(job)
        await wait_for(running)
        worker.cancel(queued)
        if "free_unstarted_at_once" in kind.cannot:
            release.set()  # its job_done would wait for the busy job: fail at once instead
        value, error = await host.outcome(queued)
        assert (value, type(error)) == (None, asyncio.CancelledError)
        assert not host.outcomes[busy.id].done()
        release.set()
        assert await host.outcome(last) == (None, None)
        assert ("started", queued.id) not in host.events
        assert queued.run_time is None
        assert host.run_times[queued.id] is None
        assert list(ran) == ["last"]
    finally:
        release.set()
        await worker.stop()


async def test_a_job_the_host_marked_cancelled_never_starts(request: Any, kind: Kind) -> None:
    """A job already CANCELLED when sent, and one marked CANCELLED while queued (as
    ``terminate`` marks them, without a word to the worker), never run: each ends through
    job_done with CancelledError."""
    unable(request, kind, "reads_state")
    host = Host()
    worker = await started(kind.make(), host)
    running, release = kind.event(), kind.event()
    ran = kind.log()
    try:
        busy = host.job(kind.block, running, release)
        marked, early = (host.job(ran.append, n) for n in ("marked", "early"))
        last = host.job(ran.append, "last")
        early.state = JobState.CANCELLED
        for job in (busy, marked, early, last):
            worker.send(job)
        await wait_for(running)
        marked.state = JobState.CANCELLED
        release.set()
        assert await host.outcome(last) == (None, None)
        for job in (marked, early):
            assert host.outcomes[job.id].done()
            value, error = host.outcomes[job.id].result()
            assert (value, type(error)) == (None, asyncio.CancelledError)
            assert ("started", job.id) not in host.events
        assert list(ran) == ["last"]
    finally:
        release.set()
        await worker.stop()


@key
async def test_cancel_interrupts_a_running_call_and_the_worker_serves_on(
    request: Any, kind: Kind
) -> None:
    """Cancelling a running call, or a running coroutine, interrupts it with
    CancelledError; job_done reports that, and the worker serves the next job (no loss)."""
    host = Host()
    worker = await started(kind.make(), host)
    running, release, release_coroutine = kind.event(), kind.event(), kind.event()
    runs_on = "interrupt" in kind.cannot  # then the call goes on: let it end, freeing
    try:  # the cluster's thread for the next job
        job = send(worker, host.job(kind.interruptible, running, release))
        await wait_for(running)
        worker.cancel(job, grace=BOUND)
        _, error = await host.outcome(job)
        assert isinstance(error, asyncio.CancelledError)
        if runs_on:
            release.set()
        fn, args = waiting_coroutine(kind, release_coroutine)
        coroutine = send(worker, acked(kind, host.job(fn, *args)))
        await waits.until(lambda: ("started", coroutine.id) in host.events, BOUND)
        worker.cancel(coroutine, grace=BOUND)
        _, error = await host.outcome(coroutine)
        assert isinstance(error, asyncio.CancelledError)
        if runs_on:
            release_coroutine.set()
        assert await host.outcome(send(worker, host.job(tasks.add, 1, 2))) == (3, None)
        assert worker.alive
        assert not host.lost.done()
    finally:
        release.set()
        release_coroutine.set()
        await worker.stop()


async def test_cancel_interrupts_a_call_blocked_in_c(request: Any, kind: Kind) -> None:
    """Cancelling a call that waits blocked (in C where it can be: a lock's wait, a
    sleep) interrupts it there: job_done with CancelledError, no loss, and the worker
    serves on."""
    unable(request, kind, "interrupt_in_c")
    host = Host()
    worker = await started(kind.make(), host)
    running, release = kind.event(), kind.event()
    try:
        job = send(worker, host.job(kind.block, running, release))
        await wait_for(running)
        worker.cancel(job, grace=0.3)
        assert await loss_or_outcome(host, job) == "done"
        _, error = await host.outcome(job)
        assert isinstance(error, asyncio.CancelledError)
        assert await host.outcome(send(worker, host.job(tasks.add, 1, 2))) == (3, None)
    finally:
        release.set()
        await worker.stop()


@key
async def test_a_call_ignoring_cancel_is_abandoned_after_grace(request: Any, kind: Kind) -> None:
    """A call that swallows cancellation is still running after the grace period: the
    worker gives up, is dead, and reports the call as started and the queued job as
    unstarted; the abandoned call's outcome is never reported."""
    lacks(kind, "give_up")
    host = Host()
    worker = await started(kind.make(), host)
    running, release = kind.event(), kind.event()
    caught = kind.log()
    try:
        job = send(worker, host.job(kind.stubborn, running, release, caught))
        queued = send(worker, host.job(tasks.add, 1, 1))
        await wait_for(running)
        began = time.monotonic()
        worker.cancel(job, grace=0.2)
        assert await loss_or_outcome(host, job) == "lost"
        error, unstarted, lost = await host.loss()
        # Not before the grace period (uvloop's timers count whole ms: up to 1 ms early).
        assert time.monotonic() - began >= 0.2 - 0.002
        assert isinstance(error, corral.WorkerLostError)
        if not kind.remote:  # a process says how it died: killed by SIGKILL
            assert "still running 0.2 s after it was cancelled" in str(error)
        assert (unstarted, lost) == ([queued], [job])
        assert not worker.alive
        assert list(caught)[:1] == ["cancelled"]
    finally:
        release.set()
        await worker.kill()  # dead already where the test passed
    await settle(kind, worker)
    # Cancelled once by cancel(); a task once more as the worker gives up on it.
    assert list(caught) == ["cancelled"] * (2 if kind.give_up_cancels_again else 1)
    assert not host.outcomes[job.id].done()
    assert not host.outcomes[queued.id].done()
    await worker.stop()  # dead already: returns


@pytest.mark.parametrize("handles", [False, True], ids=["raising", "handling"])
async def test_grace_zero_gives_up_at_once(request: Any, kind: Kind, handles: bool) -> None:
    """cancel(grace=0) on a running call gives the worker up without waiting, even for a
    call that would have stopped (by raising CancelledError, or by handling it and
    returning); the call is stopped, its thread (if it has one) ends without being
    released, and its outcome is ignored."""
    lacks(kind, "give_up")
    host = Host()
    worker = await started(kind.make(), host)
    running, release = kind.event(), kind.event()
    try:
        if handles:
            job = send(worker, host.job(handle_cancel, running, release))
        else:
            job = send(worker, host.job(kind.interruptible, running, release))
        await wait_for(running)
        worker.cancel(job, grace=0)
        assert await loss_or_outcome(host, job) == "lost"
        _, unstarted, lost = await host.loss()
        assert (unstarted, lost) == ([], [job])
        assert not worker.alive
        await settle(kind, worker)  # interrupted, without being released
    finally:
        release.set()
        await worker.kill()  # dead already where the test passed
    assert not host.outcomes[job.id].done()


@key
async def test_stop_finishes_the_jobs_already_sent(kind: Kind) -> None:
    """stop() returns once every job already sent has run, coroutines and plain calls, and
    no thread of the worker is left; no loss is reported."""
    before = set(threading.enumerate())
    host = Host()
    worker = await started(kind.make(), host)
    jobs = [host.job(asyncio.sleep, 0.01, i) for i in range(5)]
    jobs += [host.job(time.sleep, 0.01) for _ in range(5)]
    for job in jobs:
        worker.send(job)
    async with asyncio.timeout(BOUND):
        await worker.stop()
    outcomes = [host.outcomes[job.id].result() for job in jobs]
    assert outcomes == [(i, None) for i in range(5)] + [(None, None)] * 5
    assert new_threads(kind, before) == []
    assert not worker.alive
    assert not host.lost.done()


@key
async def test_kill_reports_what_it_held(request: Any, kind: Kind) -> None:
    """kill() reports the running job as started and the queued ones as unstarted, in
    order, and returns without waiting for the running call; the call's later outcome is
    ignored."""
    host = Host()
    worker = await started(kind.make(), host)
    running, release = kind.event(), kind.event()
    try:
        busy = host.job(kind.block, running, release)
        queued = [host.job(tasks.add, i, i) for i in range(3)]
        for job in (busy, *queued):
            worker.send(job)
        await wait_for(running)
        async with asyncio.timeout(BOUND):
            await worker.kill()
        error, unstarted, lost = await host.loss()
        assert isinstance(error, corral.WorkerLostError)
        assert "killed" in str(error)
        assert not worker.alive
        # Every job it held, once; the running one started; then, where it knows, the
        # queued ones unstarted, in order.
        assert sorted(job.id for job in [*unstarted, *lost]) == [busy.id, *(j.id for j in queued)]
        assert busy in lost
        assert (unstarted, lost) == (queued, [busy])
    finally:
        release.set()
        await worker.kill()  # dead already where the test passed
    await settle(kind, worker)
    assert not any(host.outcomes[job.id].done() for job in (busy, *queued))


@key
async def test_kill_when_idle_leaves_nothing_and_reports_nothing(kind: Kind) -> None:
    """An idle worker killed on purpose is dead, reports no loss, and no thread of it is
    left when kill() returns."""
    before = set(threading.enumerate())
    host = Host()
    worker = await started(kind.make(), host)
    async with asyncio.timeout(BOUND):
        await worker.kill()
    assert not worker.alive
    assert new_threads(kind, before) == []
    assert not host.lost.done()


async def test_run_time_is_the_time_in_the_call(kind: Kind) -> None:
    """run_time, set before job_done, is the time the call took (0.2 s: within 10%), for
    a coroutine and for a plain call."""
    host = Host()
    worker = await started(kind.make(), host)
    try:
        for fn in (asyncio.sleep, time.sleep):
            job = send(worker, host.job(fn, 0.2))
            await host.outcome(job)
            run_time = host.run_times[job.id]
            assert run_time is not None
            assert 0.2 <= run_time < 0.22
    finally:
        await worker.stop()


async def test_may_have_started_is_never_false_for_a_begun_job(kind: Kind) -> None:
    """may_have_started says True for the job running; for a job queued behind it a kind
    that knows says False (it may be withdrawn without interrupting anything), and that
    job is indeed reported unstarted when the worker dies."""
    host = Host()
    worker = await started(kind.make(), host)
    running, release = kind.event(), kind.event()
    try:
        busy = send(worker, host.job(kind.block, running, release))
        queued = send(worker, host.job(tasks.add, 1, 1))
        await wait_for(running)
        assert worker.may_have_started(busy)
        said = worker.may_have_started(queued)
        assert said is not kind.tells_unstarted
        await worker.kill()
        _, unstarted, _ = await host.loss()
        if not said:
            assert unstarted == [queued]
    finally:
        release.set()
        await worker.kill()  # dead already where the test passed
    await settle(kind, worker)


async def test_a_dead_worker_still_answers(request: Any, kind: Kind) -> None:
    """Once dead, a worker still answers may_have_started, pid and rss() (None where it
    has no process any more) without raising: a host may ask while it handles the loss."""
    unable(request, kind, "dead_answers")
    host = Host()
    worker = await started(kind.make(), host)
    job = send(worker, host.job(tasks.add, 1, 1))
    await host.outcome(job)
    await worker.kill()
    assert worker.may_have_started(job) in (True, False)
    assert worker.pid == kind.pid(worker)
    assert worker.rss() is None


# -- streams and reports -----------------------------------------------------------------


async def test_a_stream_runs_ahead_only_as_far_as_its_credit(kind: Kind) -> None:
    """A stream makes exactly its credit of items, then waits for more while the worker
    serves other jobs; credit(n) lets it make n more; cancel closes the generator in the
    thread the calls run in and ends the job with CancelledError, after its items."""
    host = Host()
    worker = await started(kind.make(), host)
    produced, closed, where = kind.log(), kind.event(), kind.log()
    job = send(worker, host.job(counting, produced, closed, where, window=10))
    try:
        assert await host.until_items(job, 10) == list(range(10))
        assert await host.outcome(send(worker, host.job(async_add, 1, 2))) == (3, None)
        assert len(list(produced)) == 10  # it waited for credit while the call ran
        worker.credit(job, 5)
        assert await host.until_items(job, 15) == list(range(15))
        assert await host.outcome(send(worker, host.job(tasks.add, 2, 2))) == (4, None)
        assert len(list(produced)) == 15
        worker.cancel(job)
        _, error = await host.outcome(job)
        assert isinstance(error, asyncio.CancelledError)
        await wait_for(closed)
        if kind.thread(worker) is not None:
            assert list(where) == [kind.thread(worker)]
        assert host.run_times[job.id] is not None
        assert host.items[job.id] == list(range(15))
        assert worker.alive and not host.lost.done()
    finally:
        await worker.stop()


async def test_reports_and_items_come_in_order_before_done(kind: Kind) -> None:
    """corral.report from a plain call, a coroutine and a generator reaches job_report in
    order, in the loop's thread, before job_done (a generator's before the items made
    after it); the reporter is set only while the job runs."""
    host = Host()
    worker = await started(kind.make(), host)
    try:
        for fn in (tasks.report_numbers, async_report_each):
            job = send(worker, acked(kind, host.job(fn, 3)))
            assert await host.outcome(job) == ("finished", None)
            assert host.reports[job.id] == [0, 1, 2]
            mine = [event for event in host.events if event[1] == job.id]
            assert mine == [("started", job.id), *[("report", job.id)] * 3, ("done", job.id)]
        job = send(worker, host.job(tasks.report_then_yield, 3, window=100))
        assert await host.outcome(job) == (None, None)
        assert host.reports[job.id] == ["before 0", "before 1", "before 2"]
        assert host.items[job.id] == [0, 1, 2]
        mine = [event for event in host.events if event[1] == job.id]
        assert mine[-2:] == [("items", job.id), ("done", job.id)]
    finally:
        await worker.stop()
    with pytest.raises(RuntimeError, match="outside a task"):
        corral.report("after")


@pytest.mark.parametrize("end", ["stop", "kill"])
async def test_stop_and_kill_close_open_streams_and_report_them_lost(
    request: Any, kind: Kind, end: str
) -> None:
    """A worker stopped or killed with a stream open closes its generator in the thread
    its calls run in (finally runs: before stop returns, and before kill returns where
    the loop closes it), as a process child does at EOF, and reports the stream as
    started in worker_lost."""
    if end == "stop":
        lacks(kind, "stop_with_streams")  # it would wait BOUND seconds for the stream
    if end == "kill":
        unable(request, kind, "kill_closes_streams")
    host = Host()
    worker = await started(kind.make(), host)
    produced, closed, where = kind.log(), kind.event(), kind.log()
    job = send(worker, host.job(counting, produced, closed, where, window=2))
    await host.until_items(job, 2)
    try:
        async with asyncio.timeout(BOUND):
            await (worker.stop() if end == "stop" else worker.kill())
    finally:
        await worker.kill()  # dead already where it stopped
    if end == "stop" or kind.kill_closes_streams:
        assert closed.is_set()
    error, unstarted, lost = await host.loss()
    assert isinstance(error, corral.WorkerLostError)
    assert (unstarted, lost) == ([], [job])
    if end == "kill" and "kill_closes_streams" in kind.cannot:
        assert closed.is_set()  # it never will be: fail now rather than after a wait
    await wait_for(closed)
    if kind.thread(worker) is not None:
        assert list(where) == [kind.thread(worker)]
    await settle(kind, worker)
    assert not worker.alive


# -- through a TaskQueue ---------------------------------------------------------------


@key
async def test_task_queue_runs_calls_as_the_worker_does(kind: Kind) -> None:
    """Through a TaskQueue: values and exceptions of plain calls and coroutines, soft
    limits, and cancellation of a running call, as from the worker itself; the worker
    serves on after the cancel."""
    running, release = kind.event(), kind.event()
    try:
        async with corral.TaskQueue() as queue:
            async with asyncio.timeout(BOUND):
                await queue.attach(kind.make())
                assert await queue.run(tasks.add, 2, 40) == 42
                with pytest.raises(ValueError, match="boom"):
                    await queue.run(tasks.fail, "boom")
                assert await queue.run(async_add, 1, 1) == 2
                with pytest.raises(ValueError, match="bang"):
                    await queue.run(async_fail, "bang")
                with pytest.raises(corral.SoftTimeLimitExceeded):
                    await queue.run(sleeper(kind), BOUND, soft_time_limit=0.05)
                job = queue.submit(kind.interruptible, running, release)
                await wait_for(running)
                job.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await job
                assert await queue.run(tasks.add, 1, 1) == 2
    finally:
        release.set()
