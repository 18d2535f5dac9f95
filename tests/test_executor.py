"""``corral.Executor``: the ``concurrent.futures`` behaviours users rely on (a port of the
relevant parts of CPython's ``Lib/test/test_concurrent_futures``), and what the standard
executors cannot do: stop a running call when its future, or the asyncio task awaiting it
through ``run_in_executor``, is cancelled."""

from __future__ import annotations

import asyncio
import gc
import itertools
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import psutil
import pytest

import corral
from tests import tasks
from tests.waits import bounded, until, wait_until

BOUND = 30.0  # seconds: the most any wait in these tests may take before it fails


def _executor(workers: int = 2, **options: Any) -> corral.Executor:
    """An executor whose workers fork from this process: quick to start, and they find
    the functions of this module by reference."""
    return corral.Executor(workers, start_method="fork", **options)


# CPython 3.13.0 runs no signal handler in a process forked from a thread other than the
# main one while that process runs bytecode (the signal is flagged on the parent's main
# thread state), and the executor forks from its own thread: interrupting a running call
# there ends with its worker killed after the grace period (docs/calls.md: what it rests on).
_FORK_LOSES_SIGNALS = sys.version_info[:3] == (3, 13, 0)


def _interruptible_executor(workers: int = 2) -> corral.Executor:
    """An executor whose running calls can be interrupted on every Python version."""
    if _FORK_LOSES_SIGNALS:
        return corral.Executor(workers, start_method="forkserver")
    return _executor(workers)


# -- functions the workers run --------------------------------------------------------------


def capture(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def mul(x: int, y: int) -> int:
    return x * y


def mark_then_wait(started: str, gate: str, cleaned: str = "") -> int:
    """Write this worker's pid to started, wait until gate exists (30 s at most), and
    write the pid to cleaned on the way out, whatever ends the call; return the pid."""
    pid = str(os.getpid())
    try:
        # in the try: a cancel that comes once started exists runs the finally
        tasks.write_atomically(started, pid)
        deadline = time.monotonic() + BOUND
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        if cleaned:
            tasks.write_atomically(cleaned, pid)
    return os.getpid()


class Big:
    """A result large enough to matter, that the tests can watch being freed."""

    def __init__(self) -> None:
        self.payload = bytes(1 << 20)


def make_big(_: int) -> Big:
    return Big()


# Set in this process before its workers start: only a forked worker inherits the mark.
_INHERITED: list[int] = []


def where_am_i() -> tuple[int, bool]:
    """Run in a worker: its parent's pid, and whether it inherited this process's memory."""
    return os.getppid(), bool(_INHERITED)


# -- submit, result, exception --------------------------------------------------------------


def test_submit_returns_the_value() -> None:
    """``submit`` gives a future whose ``result`` is the call's value."""
    with _executor() as executor:
        future = executor.submit(pow, 2, 8)
        assert future.result(timeout=BOUND) == 256
        assert future.done()
        assert not future.running()
        assert not future.cancelled()
        assert isinstance(future, futures.Future)


def test_submit_passes_keyword_arguments() -> None:
    """Keyword arguments reach the function (through ``functools.partial``), even ones
    named ``fn`` or ``self``; ``fn`` itself is positional-only."""
    with _executor() as executor:
        assert executor.submit(mul, 2, y=8).result(timeout=BOUND) == 16
        future = executor.submit(capture, 1, self=2, fn=3)
        assert future.result(timeout=BOUND) == ((1,), {"self": 2, "fn": 3})
        with pytest.raises(TypeError):
            executor.submit(fn=capture, arg=1)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            executor.submit(arg=1)  # type: ignore[call-arg]


def test_an_exception_keeps_its_type_and_the_workers_traceback() -> None:
    """A task's exception is raised by ``result`` as the same type, with the worker's
    traceback as its cause; ``exception()`` returns it."""
    with _executor() as executor:
        future = executor.submit(tasks.raise_task_error, "bad input")
        error = future.exception(timeout=BOUND)
        assert isinstance(error, tasks.TaskError)
        assert isinstance(error.__cause__, corral.RemoteTraceback)
        assert "raise_task_error" in str(error.__cause__)
        with pytest.raises(tasks.TaskError, match="bad input"):
            future.result()


def test_a_call_that_will_not_pickle_fails_its_future_only() -> None:
    """An unpicklable argument fails that call's future with ``SerializationError``; the
    executor serves the next call."""
    with _executor() as executor:
        bad = executor.submit(tasks.identity, threading.Lock())
        assert isinstance(bad.exception(timeout=BOUND), corral.SerializationError)
        assert executor.submit(tasks.add, 1, 2).result(timeout=BOUND) == 3


class ExitsWhenPickled:
    """An argument whose pickling, in the executor's thread, calls ``sys.exit()``."""

    def __reduce__(self) -> tuple[Any, ...]:
        sys.exit(1)


def test_a_call_whose_pickling_exits_fails_its_future_only() -> None:
    """A ``SystemExit`` raised by the call's own code while it is pickled, in the bridge's
    thread, fails that call's future; the executor serves the next call. (It escaped the
    bridge's loop: the future never completed.)"""
    with _executor(1) as executor:
        error = executor.submit(tasks.identity, ExitsWhenPickled()).exception(timeout=BOUND)
        assert "SystemExit" in f"{type(error).__name__} {error}"
        assert executor.submit(tasks.add, 1, 2).result(timeout=BOUND) == 3


def test_a_worker_that_dies_costs_only_its_call() -> None:
    """Unlike ``ProcessPoolExecutor``, which breaks for good, a dead worker fails only its
    own call (``WorkerLostError``) and the executor keeps serving."""
    with _executor(1) as executor:
        lost = executor.submit(tasks.exit_now, 3)
        error = lost.exception(timeout=BOUND)
        assert isinstance(error, corral.WorkerLostError)
        assert error.exitcode == 3
        assert executor.submit(tasks.add, 2, 2).result(timeout=BOUND) == 4


def test_a_callback_raising_system_exit_leaves_the_executor_serving(tmp_path: Path) -> None:
    """A done-callback runs in the bridge's thread; one that raises ``SystemExit`` (asyncio
    lets it out of the loop) is reported, and the calls in flight and later ones are still
    served. (It used to end the bridge: every pending call was cancelled and the next
    ``submit`` raised "Event loop is closed".)"""
    gate = tmp_path / "gate"
    with _executor(1) as executor:
        first = executor.submit(tasks.wait_for_file, str(gate), BOUND)
        behind = executor.submit(tasks.add, 1, 1)
        first.add_done_callback(lambda _: sys.exit("from a done-callback"))
        gate.touch()
        assert first.result(timeout=BOUND) > 0
        assert behind.result(timeout=BOUND) == 2
        assert executor.submit(tasks.add, 2, 2).result(timeout=BOUND) == 4


def test_not_callable_is_refused_at_the_call() -> None:
    """Submitting something that cannot be called raises TypeError at once."""
    with _executor(1) as executor, pytest.raises(TypeError, match="callable"):
        executor.submit(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_max_workers_is_refused(bad: Any) -> None:
    """``max_workers`` must be a positive int (or None), as in the standard library."""
    with pytest.raises(ValueError, match="max_workers"):
        corral.Executor(bad)


@pytest.mark.parametrize(
    ("method", "inherits", "my_child"),
    [("fork", True, True), ("spawn", False, True), ("forkserver", False, False)],
)
def test_mp_context_chooses_the_start_method(method: str, inherits: bool, my_child: bool) -> None:
    """``mp_context=``, as ``ProcessPoolExecutor`` takes it, starts the workers by the
    context's method: a forked worker inherits this process's memory, a spawned one does
    not, and a forkserver's is the server's child, not this process's."""
    _INHERITED.append(1)
    try:
        context = multiprocessing.get_context(method)
        with corral.Executor(1, mp_context=context) as executor:
            ppid, inherited = executor.submit(where_am_i).result(timeout=BOUND)
    finally:
        _INHERITED.clear()
    assert inherited is inherits
    assert (ppid == os.getpid()) is my_child


class _ThreadContext:
    """Looks like a multiprocessing context, with a start method corral cannot use."""

    def get_start_method(self, allow_none: bool = False) -> str:
        return "thread"


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"mp_context": "spawn"}, TypeError, "mp_context must be a multiprocessing context"),
        ({"mp_context": _ThreadContext()}, ValueError, "start method 'thread' cannot start"),
        (
            {"mp_context": multiprocessing.get_context("spawn"), "start_method": "fork"},
            ValueError,
            "contradicts start_method='fork'",
        ),
        (
            {"mp_context": multiprocessing.get_context("spawn"), "kind": "thread"},
            ValueError,
            "mp_context applies to process workers",
        ),
    ],
)
def test_a_bad_mp_context_is_refused_at_construction(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    """An ``mp_context`` that is no context, whose start method corral cannot use, or that
    contradicts the other options is refused when the executor is made, saying which."""
    with pytest.raises(error, match=match):
        corral.Executor(1, **options)


def test_a_bad_pool_option_is_refused_at_construction() -> None:
    """Pool options are checked when the executor is made, before any thread starts."""
    threads = threading.active_count()
    with pytest.raises(ValueError, match="strategy"):
        corral.Executor(1, strategy="eager")
    assert threading.active_count() == threads


def test_submits_from_many_threads() -> None:
    """Several threads submitting at once each get their own results."""
    with _executor() as executor:
        results: dict[int, list[int]] = {}

        def submit_many(t: int) -> None:
            fs = [executor.submit(tasks.add, t * 1000, i) for i in range(200)]
            results[t] = [f.result(timeout=BOUND) for f in fs]

        threads = [threading.Thread(target=submit_many, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(BOUND)
        assert results == {t: [t * 1000 + i for i in range(200)] for t in range(4)}


def test_done_callbacks_run_once_done() -> None:
    """``add_done_callback`` runs after the call finishes (and at once on a finished
    future), with the future as its argument."""
    with _executor(1) as executor:
        seen: list[Any] = []
        done = threading.Event()
        future = executor.submit(tasks.add, 1, 1)
        future.add_done_callback(lambda f: (seen.append(f.result()), done.set()))
        assert done.wait(BOUND)
        future.add_done_callback(lambda f: seen.append("again"))
        assert seen == [2, "again"]


# -- map ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_map_returns_results_in_order(chunksize: int) -> None:
    """``map`` yields fn(*args) in input order for any chunksize, over several
    iterables zipped (to the shortest)."""
    with _executor() as executor:
        assert list(executor.map(tasks.square, range(20), chunksize=chunksize)) == [
            i * i for i in range(20)
        ]
        assert list(executor.map(tasks.add, range(5), range(10), chunksize=chunksize)) == [
            0,
            2,
            4,
            6,
            8,
        ]


def test_map_raises_at_the_failing_item() -> None:
    """An exception is raised by the iterator at the item that raised it."""
    with _executor() as executor:
        results = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
        assert next(results) == (0, 1)
        assert next(results) == (0, 1)
        with pytest.raises(ZeroDivisionError):
            next(results)


def test_map_timeout_raises_from_the_iterator_and_stops_the_late_call(tmp_path: Path) -> None:
    """``timeout`` counts from the ``map`` call: a result not ready in time raises
    TimeoutError from ``__next__``, after the results that were; the late call, running,
    is cancelled and stopped in its worker."""
    started, gate, cleaned = (str(tmp_path / name) for name in ("started", "gate", "cleaned"))
    with _interruptible_executor() as executor:
        results: list[Any] = []
        calls = [(tasks.add, 0, 0), (tasks.add, 1, 1), (mark_then_wait, started, gate, cleaned)]
        mapped = executor.map(_apply, calls, timeout=1.5)
        with pytest.raises(futures.TimeoutError):
            results.extend(mapped)
        assert results == [0, 2]
        wait_until(lambda: os.path.exists(cleaned))  # interrupted, though the gate never opened
        assert not os.path.exists(gate)


def _apply(call: tuple[Any, ...]) -> Any:
    fn, *args = call
    return fn(*args)


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_keeps_no_result_it_yielded(chunksize: int) -> None:
    """The iterator of ``map`` holds no reference to a result it has yielded: a large
    result the consumer drops is freed (the standard library's ``test_free_reference``)."""
    with _executor() as executor:
        for big in executor.map(make_big, range(6), chunksize=chunksize):
            freed = weakref.ref(big)
            del big
            wait_until(lambda ref=freed: ref() is None)


def test_map_rejects_a_bad_chunksize() -> None:
    """``chunksize`` below 1 is refused, as ``ProcessPoolExecutor`` refuses it."""
    with _executor(1) as executor, pytest.raises(ValueError, match="chunksize"):
        executor.map(tasks.square, range(3), chunksize=0)


@pytest.mark.parametrize("buffersize", ["foo", 2.0])
def test_map_buffersize_type_is_checked(buffersize: Any) -> None:
    """A buffersize that is not an int raises TypeError (as in Python 3.14)."""
    with _executor(1) as executor, pytest.raises(TypeError, match="buffersize must be an integer"):
        executor.map(str, range(4), buffersize=buffersize)


@pytest.mark.parametrize("buffersize", [0, -1])
def test_map_buffersize_value_is_checked(buffersize: int) -> None:
    """A buffersize below 1 raises ValueError (as in Python 3.14)."""
    with (
        _executor(1) as executor,
        pytest.raises(ValueError, match="buffersize must be None or > 0"),
    ):
        executor.map(str, range(4), buffersize=buffersize)


def test_map_with_buffersize_gives_every_result_in_order() -> None:
    """With any buffersize, smaller or larger than the input, and over several
    iterables, every result comes, in order."""
    with _executor() as executor:
        for buffersize in (1, 2, 4, 8):
            assert list(executor.map(str, range(4), buffersize=buffersize)) == ["0", "1", "2", "3"]
            assert list(executor.map(tasks.add, range(4), range(4), buffersize=buffersize)) == [
                0,
                2,
                4,
                6,
            ]
        assert next(executor.map(str, [], buffersize=2), None) is None
        assert next(executor.map(str, buffersize=2), None) is None


def test_map_with_buffersize_works_on_endless_input() -> None:
    """An endless input works with buffersize: only what is consumed is computed."""
    with _executor() as executor:
        results = executor.map(str, itertools.count(), buffersize=2)
        assert [next(results) for _ in range(3)] == ["0", "1", "2"]
        pairs = executor.map(tasks.add, itertools.count(), itertools.count(), buffersize=2)
        assert [next(pairs) for _ in range(3)] == [0, 2, 4]
        results.close()  # cancels what is still in flight
        pairs.close()


def _counting(n: int, taken: list[int]) -> Iterator[int]:
    for i in range(n):
        taken.append(i)
        yield i


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_with_buffersize_reads_its_input_lazily(chunksize: int) -> None:
    """At most buffersize calls (chunks) are submitted ahead of the consumer: ``map``
    reads that many from its input, and each result taken lets one more in."""
    with _executor() as executor:
        taken: list[int] = []
        results = executor.map(
            tasks.square, _counting(100, taken), chunksize=chunksize, buffersize=3
        )
        assert len(taken) == 3 * chunksize
        assert next(results) == 0
        assert len(taken) == 4 * chunksize
        results.close()


def test_map_without_buffersize_submits_everything_at_once() -> None:
    """Without buffersize the whole input is read when ``map`` is called."""
    with _executor() as executor:
        taken: list[int] = []
        results = executor.map(tasks.square, _counting(10, taken))
        assert len(taken) == 10
        assert list(results) == [i * i for i in range(10)]


def test_map_with_a_full_buffer_reads_no_further() -> None:
    """A map whose results are never taken reads only buffersize items, even after the
    executor has finished its calls."""
    ints = iter(range(4))
    executor = _executor()
    executor.map(str, ints, buffersize=2)
    executor.shutdown(wait=True)
    assert next(ints) == 2


# -- shutdown -------------------------------------------------------------------------------


def test_shutdown_with_wait_finishes_the_calls_and_stops_the_workers() -> None:
    """``shutdown(wait=True)`` returns once every pending call is done and the worker
    processes have exited."""
    executor = _executor()
    pids = set(executor.map(tasks.sleep_then_pid, [0.05] * 6))
    fs = [executor.submit(tasks.sleep, 0.05) for _ in range(6)]
    executor.shutdown(wait=True)
    assert all(f.done() and f.result() == 0.05 for f in fs)
    assert pids
    assert not any(psutil.pid_exists(pid) for pid in pids)


def test_shutdown_without_wait_returns_at_once_and_the_calls_still_finish(
    tmp_path: Path,
) -> None:
    """``shutdown(wait=False)`` returns while calls are still blocked; they finish later,
    and new calls are refused meanwhile."""
    gate = str(tmp_path / "gate")
    executor = _executor()
    fs = [executor.submit(tasks.wait_for_file, gate, BOUND) for _ in range(3)]
    executor.shutdown(wait=False)
    assert not any(f.done() for f in fs)  # the gate is closed: shutdown did not wait
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(tasks.add, 1, 1)
    Path(gate).touch()
    done, not_done = futures.wait(fs, timeout=BOUND)
    assert not not_done
    assert all(isinstance(f.result(), int) for f in done)
    executor.shutdown(wait=True)  # a second call is fine: it only waits


def test_shutdown_cancel_futures_cancels_what_has_not_started() -> None:
    """``cancel_futures=True`` cancels the calls no worker has started; the others
    finish normally."""
    executor = _executor()
    fs = [executor.submit(tasks.sleep, 0.1) for _ in range(50)]
    executor.shutdown(cancel_futures=True)
    cancelled = [f for f in fs if f.cancelled()]
    assert len(cancelled) > 20
    for f in fs:
        if not f.cancelled():
            assert f.done()
            assert f.exception() is None


def test_shutdown_cancel_futures_spares_the_running_call(tmp_path: Path) -> None:
    """A running call is not cancelled by ``cancel_futures`` (as in the standard
    library); the queued ones are, and never run."""
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    ledger = str(tmp_path / "ledger")
    executor = _executor(1)
    running = executor.submit(mark_then_wait, started, gate)
    queued = [executor.submit(tasks.record, ledger, i) for i in range(5)]
    wait_until(lambda: os.path.exists(started))
    executor.shutdown(wait=False, cancel_futures=True)
    done, _ = futures.wait(queued, timeout=BOUND)
    assert all(f.cancelled() for f in done) and len(done) == 5
    assert not running.done()
    Path(gate).touch()
    assert running.result(timeout=BOUND) == int(Path(started).read_text())
    executor.shutdown(wait=True)
    assert not os.path.exists(ledger)


def test_use_after_shutdown_raises_runtime_error() -> None:
    """After shutdown, ``submit`` and ``map`` raise RuntimeError with the standard
    library's message; shutting down again is harmless."""
    executor = _executor(1)
    executor.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(pow, 2, 5)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.map(pow, [2], [5])
    executor.shutdown()
    executor.shutdown(wait=False, cancel_futures=True)


def test_context_manager_shuts_down_on_exit() -> None:
    """Leaving ``with`` waits for the calls and shuts the executor down."""
    with _executor() as executor:
        fs = [executor.submit(tasks.sleep, 0.02) for _ in range(4)]
    assert all(f.done() for f in fs)
    with pytest.raises(RuntimeError):
        executor.submit(tasks.add, 1, 1)


def test_shutdown_from_a_done_callback_does_not_deadlock() -> None:
    """A done-callback (run in the executor's own thread) may call ``shutdown``: it
    cannot wait for its own thread, so it returns at once."""
    executor = _executor(1)
    returned = threading.Event()
    future = executor.submit(tasks.add, 1, 1)
    future.add_done_callback(lambda _: (executor.shutdown(), returned.set()))
    assert returned.wait(BOUND)
    executor.shutdown(wait=True)


def test_a_collected_executor_finishes_its_calls() -> None:
    """An executor dropped without ``shutdown`` finishes the calls it accepted, then
    stops (its thread ends, its workers exit)."""
    before = set(threading.enumerate())
    executor = _executor()
    results = executor.map(abs, range(-5, 5))
    del executor
    gc.collect()
    assert list(results) == [abs(i) for i in range(-5, 5)]
    for thread in set(threading.enumerate()) - before:
        thread.join(BOUND)
        assert not thread.is_alive()


@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_the_interpreter_waits_at_exit_for_accepted_calls(
    tmp_path: Path, start_method: str
) -> None:
    """A program that exits without shutting its executor down still has its accepted
    calls run to the end first, as with the standard library's executors, by every start
    method. (Python 3.12 cannot fork once its shutdown has begun: under fork the first
    call starts the workers before it returns.)"""
    ledger = tmp_path / "ledger"
    script = textwrap.dedent(
        f"""
        import corral
        from tests import tasks

        executor = corral.Executor(1, start_method={start_method!r})
        executor.submit(tasks.sleep, 0.2)
        executor.submit(tasks.append_line, {str(ledger)!r}, "ran")
        """
    )
    subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
        timeout=BOUND,
    )
    assert ledger.read_text().split()[0] == "ran"


# -- as_completed and wait ------------------------------------------------------------------


def test_as_completed_yields_every_future(tmp_path: Path) -> None:
    """``as_completed`` yields finished, failed and cancelled futures alike."""
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with _executor(1) as executor:
        ok = executor.submit(tasks.add, 1, 2)
        failed = executor.submit(tasks.fail, "no")
        blocker = executor.submit(mark_then_wait, started, gate)
        pending = executor.submit(tasks.add, 3, 4)
        wait_until(lambda: os.path.exists(started))
        assert pending.cancel()
        assert blocker.cancel()  # running: stopped in its worker
        seen = set(futures.as_completed([ok, failed, blocker, pending], timeout=BOUND))
        assert seen == {ok, failed, blocker, pending}
        assert ok.result() == 3
        assert isinstance(failed.exception(), ValueError)


def test_as_completed_wakes_for_a_future_cancelled_while_it_waits(tmp_path: Path) -> None:
    """A thread blocked in ``as_completed`` is woken when another thread cancels a
    running future: the cancellation notifies waiters, as the standard library's
    executors do when they come to a cancelled call."""
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with _executor(1) as executor:
        running = executor.submit(mark_then_wait, started, gate)
        wait_until(lambda: os.path.exists(started))
        yielded: list[futures.Future[int]] = []
        waiter = threading.Thread(
            target=lambda: yielded.extend(futures.as_completed([running], timeout=BOUND))
        )
        waiter.start()
        assert running.cancel()
        waiter.join(BOUND)
        assert yielded == [running]


def test_wait_first_completed() -> None:
    """``wait(FIRST_COMPLETED)`` returns once one future is done; a cancelled running
    future counts as done at once."""
    with _executor() as executor:
        quick = executor.submit(mul, 21, 2)
        slow = executor.submit(tasks.sleep, BOUND)
        done, not_done = futures.wait(
            [quick, slow], timeout=BOUND, return_when=futures.FIRST_COMPLETED
        )
        assert done == {quick}
        assert not_done == {slow}
        assert slow.cancel()
        done, not_done = futures.wait([slow], timeout=0)
        assert done == {slow} and not not_done


def test_wait_first_exception() -> None:
    """``wait(FIRST_EXCEPTION)`` returns at the first failure."""
    with _executor() as executor:
        failing = executor.submit(tasks.raise_task_error, "first")
        slow = executor.submit(tasks.sleep, BOUND)
        done, not_done = futures.wait(
            [failing, slow], timeout=BOUND, return_when=futures.FIRST_EXCEPTION
        )
        assert done == {failing}
        assert not_done == {slow}
        slow.cancel()


def test_wait_all_completed() -> None:
    """``wait(ALL_COMPLETED)`` returns once every future is done, failures included."""
    with _executor() as executor:
        fs = [executor.submit(tasks.square, i) for i in range(6)]
        fs.append(executor.submit(tasks.fail, "also done"))
        done, not_done = futures.wait(fs, timeout=BOUND)
        assert done == set(fs) and not not_done


# -- cancellation ---------------------------------------------------------------------------


def test_a_pending_call_is_cancelled_and_never_runs(tmp_path: Path) -> None:
    """Cancelling a call still queued returns True; it never runs, and the calls behind
    it do."""
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    ledger = str(tmp_path / "ledger")
    with _executor(1) as executor:
        blocker = executor.submit(mark_then_wait, started, gate)
        victim = executor.submit(tasks.record, ledger, 1)
        after = executor.submit(tasks.record, ledger, 2)
        wait_until(lambda: os.path.exists(started))
        assert not victim.running()
        assert victim.cancel()
        assert victim.cancelled() and victim.done()
        with pytest.raises(futures.CancelledError):
            victim.result()
        Path(gate).touch()
        assert after.result(timeout=BOUND) == 2
        assert blocker.result(timeout=BOUND) > 0
    assert Path(ledger).read_text() == "2\n"


def test_a_running_call_is_cancelled_and_stopped_in_its_worker(tmp_path: Path) -> None:
    """Cancelling a running call returns True (a standard future would refuse): the
    call is interrupted inside its worker, whose ``finally`` runs, and the same worker,
    which stopped in time, serves the next call."""
    started, gate, cleaned = (str(tmp_path / name) for name in ("started", "gate", "cleaned"))
    with _interruptible_executor(1) as executor:
        future = executor.submit(mark_then_wait, started, gate, cleaned)
        wait_until(lambda: os.path.exists(started))
        wait_until(future.running)  # the bridge's thread records the hand-over a moment later
        assert future.cancel()
        assert future.cancelled() and future.done() and not future.running()
        with pytest.raises(futures.CancelledError):
            future.result()
        wait_until(lambda: os.path.exists(cleaned))
        assert not os.path.exists(gate)  # it did not simply finish: it was interrupted
        pid = int(Path(started).read_text())
        assert Path(cleaned).read_text() == str(pid)
        assert executor.submit(tasks.pid).result(timeout=BOUND) == pid


def test_cancel_after_the_result_returns_false() -> None:
    """A finished call cannot be cancelled: ``cancel`` returns False and the result
    stands."""
    with _executor(1) as executor:
        future = executor.submit(tasks.add, 1, 2)
        assert future.result(timeout=BOUND) == 3
        assert not future.cancel()
        assert not future.cancelled()
        assert future.result() == 3


def test_concurrent_cancels_agree(tmp_path: Path) -> None:
    """Threads cancelling the same futures at once all get True, and every future is
    reported done by ``wait``. (Each cancels the queued calls before the running one,
    whose end would let a queued call run and finish first.)"""
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with _executor(1) as executor:
        running = executor.submit(mark_then_wait, started, gate)
        queued = [executor.submit(tasks.add, i, i) for i in range(20)]
        wait_until(lambda: os.path.exists(started))
        everything = [*queued, running]
        barrier = threading.Barrier(3)
        answers: list[bool] = []

        def cancel_all() -> None:
            barrier.wait(BOUND)
            answers.extend(f.cancel() for f in everything)

        threads = [threading.Thread(target=cancel_all) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(BOUND)
        assert answers == [True] * 63
        done, not_done = futures.wait(everything, timeout=0)
        assert done == set(everything) and not not_done


# -- asyncio --------------------------------------------------------------------------------


async def test_run_in_executor_returns_the_value() -> None:
    """``loop.run_in_executor(executor, fn, *args)`` awaits the call's value."""
    loop = asyncio.get_running_loop()
    with _executor() as executor:
        values = await asyncio.gather(
            *(loop.run_in_executor(executor, tasks.add, i, i) for i in range(10))
        )
        assert values == [2 * i for i in range(10)]


async def test_cancelling_run_in_executor_stops_the_job(tmp_path: Path) -> None:
    """Cancelling the asyncio task awaiting ``run_in_executor`` cancels the executor's
    future (asyncio's ``wrap_future`` calls its ``cancel``), which stops the running
    call inside its worker; the worker then serves again."""
    started, gate, cleaned = (str(tmp_path / name) for name in ("started", "gate", "cleaned"))
    loop = asyncio.get_running_loop()
    with _interruptible_executor(1) as executor:
        task = asyncio.ensure_future(
            loop.run_in_executor(executor, mark_then_wait, started, gate, cleaned)
        )
        await until(lambda: os.path.exists(started))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await bounded(task)
        await until(lambda: os.path.exists(cleaned))  # the call was interrupted
        assert not os.path.exists(gate)
        pid = int(Path(started).read_text())
        assert await bounded(loop.run_in_executor(executor, tasks.pid)) == pid


# -- the default strategy, "auto" -----------------------------------------------------------


def test_at_most_prefetch_less_one_calls_wait_behind_a_long_one(tmp_path: Path) -> None:
    """Under the executor's default ``strategy="auto"``, short calls are sent ahead; a call
    that turns out long holds up at most ``prefetch - 1`` calls queued behind it in its
    worker, and the other worker takes all the rest meanwhile."""
    with _executor(2, prefetch=4) as executor:
        assert list(executor.map(tasks.square, range(40))) == [i * i for i in range(40)]
        flag = tmp_path / "go"
        long = executor.submit(tasks.wait_for_file, str(flag), BOUND)
        short = [executor.submit(tasks.square, i) for i in range(20)]
        wait_until(lambda: sum(f.done() for f in short) >= len(short) - 3)
        assert not long.done()
        flag.touch()
        assert [f.result(timeout=BOUND) for f in short] == [i * i for i in range(20)]
        assert long.result(timeout=BOUND) > 0


def test_shutdown_cancel_futures_cancels_calls_sent_ahead_too(tmp_path: Path) -> None:
    """Under the default strategy a worker whose calls are short is sent later ones ahead;
    ``shutdown(cancel_futures=True)`` cancels those it has not begun too, so only the two
    running calls finish (as in the standard library, where only running calls do)."""
    executor = _executor(2, prefetch=8)
    assert list(executor.map(tasks.square, range(40))) == [i * i for i in range(40)]
    gate = tmp_path / "gate"
    fs = [
        executor.submit(mark_then_wait, str(tmp_path / f"started-{i}"), str(gate))
        for i in range(16)
    ]
    wait_until(lambda: len(list(tmp_path.glob("started-*"))) == 2)
    executor.shutdown(wait=False, cancel_futures=True)  # the bridge cancels them soon after
    wait_until(lambda: sum(f.cancelled() for f in fs) == len(fs) - 2)
    gate.touch()
    assert not futures.wait(fs, timeout=BOUND).not_done
    ran = [f for f in fs if not f.cancelled()]
    assert len(ran) == 2
    assert all(isinstance(f.result(), int) for f in ran)
    executor.shutdown(wait=True)
    assert len(list(tmp_path.glob("started-*"))) == 2  # the cancelled ones never began


def test_map_refuses_a_bool_chunksize() -> None:
    """``chunksize=True`` is a slip, not a chunk of one: refused at the call, as a bool is
    for every count (it was taken as 1)."""
    with (
        _executor(1) as executor,
        pytest.raises(ValueError, match="chunksize must be a positive int, not True"),
    ):
        executor.map(tasks.square, range(3), chunksize=True)
