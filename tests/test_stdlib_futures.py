"""CPython's own ``concurrent.futures`` test suite, run against ``corral.Executor``.

The suite ships with the interpreter (``test.test_concurrent_futures``, a package in
Python 3.13); it is loaded here at test time, never copied. Each of its test classes for
the process pool is subclassed with ``executor_type`` set to ``corral.Executor`` (a
subclass that only remembers its instances, for tearDown), so every test the suite runs on
``ProcessPoolExecutor`` under fork, forkserver and spawn runs on corral's executor instead.
A test either passes, or it is listed in ``DIFFERENCES`` with the reason corral behaves
otherwise on purpose; a listed test is expected to fail (strictly: one that starts passing
must leave the list) unless it cannot run at all (``SKIPPED``)."""

from __future__ import annotations

import functools
import gc
import importlib
import sys
import traceback
import unittest
import weakref
from collections.abc import Callable
from typing import Any

import pytest

import corral

if sys.version_info < (3, 13):
    pytest.skip(
        "DIFFERENCES is kept against Python 3.13's test.test_concurrent_futures; CI runs "
        "this module on 3.13",
        allow_module_level=True,
    )
util = pytest.importorskip(
    "test.test_concurrent_futures.util",
    reason="this Python has no test.test_concurrent_futures: its standard library's test "
    "suite was left out of the installation",
)

# The suite's modules with process-pool tests (test_future and test_thread_pool have none).
MODULES = (
    "test_as_completed",
    "test_deadlock",
    "test_init",
    "test_process_pool",
    "test_shutdown",
    "test_wait",
)
PROCESS_MIXINS = (
    util.ProcessPoolForkMixin,
    util.ProcessPoolForkserverMixin,
    util.ProcessPoolSpawnMixin,
)

_BROKEN = (
    "a dead worker fails only its own call, with corral.WorkerLostError saying how it died, "
    "and the executor keeps serving; ProcessPoolExecutor raises BrokenProcessPool and is "
    "broken for good"
)
_WORKER_SURVIVES = (
    "{what} fails only its call, with corral.SerializationError saying what could not be "
    "{how}, where and why; the worker and the executor keep serving (ProcessPoolExecutor "
    "raises {theirs})"
)
_PRIVATE = (
    "reads ProcessPoolExecutor's private attributes ({}), which corral's executor, a "
    "different implementation, does not have"
)
_SCRIPT = (
    "runs a child interpreter that imports the executor by its name from concurrent.futures "
    "(`from concurrent.futures import Executor` is the abstract base class), so corral's "
    "cannot be named there; tests/test_executor.py proves corral's behaviour at exit"
)
_NOT_CORRAL = (
    "constructs futures.ProcessPoolExecutor itself rather than the mixin's executor_type: "
    "nothing of corral runs"
)
_CANCEL_ALL = (
    "shutdown(cancel_futures=True) cancels every call no worker has begun; right after the "
    "submits, spawned or forkserver workers have begun none, so all 50 are cancelled and "
    "the test's 'at least one finished' fails (ProcessPoolExecutor counts the calls it has "
    "already queued to its processes as begun)"
)

# Where corral.Executor differs on purpose: "<the suite's class>.<test>" -> why. A key may
# also name one start method's class ("ProcessPoolSpawnProcessPoolShutdownTest.test_x").
DIFFERENCES: dict[str, str] = {
    # test_deadlock: the crash matrix (tests/test_crash_matrix.py runs it on corral's terms).
    "ExecutorDeadlockTest.test_crash_at_task_unpickle": _BROKEN,
    "ExecutorDeadlockTest.test_crash_during_func_exec_on_worker": _BROKEN,
    "ExecutorDeadlockTest.test_crash_during_result_pickle_on_worker": _BROKEN,
    "ExecutorDeadlockTest.test_crash_big_data": _BROKEN,
    "ExecutorDeadlockTest.test_shutdown_deadlock": _BROKEN,
    "ExecutorDeadlockTest.test_shutdown_deadlock_pickle": _PRIVATE.format(
        "_executor_manager_thread"
    ),
    "ExecutorDeadlockTest.test_error_at_task_pickle": _WORKER_SURVIVES.format(
        what="an argument that will not pickle", how="pickled", theirs="the PicklingError"
    ),
    "ExecutorDeadlockTest.test_error_at_task_unpickle": _WORKER_SURVIVES.format(
        what="a call whose unpickling raises in the worker",
        how="unpickled",
        theirs="BrokenProcessPool",
    ),
    "ExecutorDeadlockTest.test_exit_at_task_unpickle": _WORKER_SURVIVES.format(
        what="a call whose unpickling exits in the worker",
        how="unpickled",
        theirs="BrokenProcessPool",
    ),
    "ExecutorDeadlockTest.test_error_during_result_pickle_on_worker": _WORKER_SURVIVES.format(
        what="a result that will not pickle", how="pickled", theirs="the PicklingError"
    ),
    "ExecutorDeadlockTest.test_exit_during_result_pickle_on_worker": _WORKER_SURVIVES.format(
        what="a result whose pickling exits in the worker",
        how="pickled",
        theirs="the SystemExit, as if the call had exited",
    ),
    "ExecutorDeadlockTest.test_error_during_result_unpickle_in_result_handler": (
        _WORKER_SURVIVES.format(
            what="a result whose unpickling raises in the parent",
            how="unpickled",
            theirs="BrokenProcessPool",
        )
    ),
    "ExecutorDeadlockTest.test_exit_during_result_unpickle_in_result_handler": (
        _WORKER_SURVIVES.format(
            what="a result whose unpickling exits in the parent",
            how="unpickled",
            theirs="BrokenProcessPool",
        )
    ),
    # test_init
    "FailingInitializerMixin.test_initializer": (
        "an initializer that raises is retried a few times, then the calls fail with "
        "corral.WorkerStartupError (the initializer's exception its cause) and nothing is "
        "logged to 'concurrent.futures'; ProcessPoolExecutor breaks with BrokenProcessPool "
        "at once"
    ),
    # test_process_pool
    "ProcessPoolExecutorTest.test_killed_child": _PRIVATE.format("_processes"),
    "ProcessPoolExecutorTest.test_saturation": _PRIVATE.format("_max_workers, _processes"),
    "ProcessPoolExecutorTest.test_idle_process_reuse_one": _PRIVATE.format(
        "_max_workers, _processes"
    ),
    "ProcessPoolExecutorTest.test_idle_process_reuse_multiple": _PRIVATE.format(
        "_max_workers, _processes"
    ),
    "ProcessPoolExecutorTest.test_max_tasks_per_child": _PRIVATE.format("_processes"),
    "ProcessPoolForkProcessPoolExecutorTest.test_max_tasks_per_child": (
        "ProcessPoolExecutor refuses max_tasks_per_child under fork, whose children it must "
        "fork from a threaded process at any time; corral allows it (Python 3.12 and later "
        "warn of forking a threaded process)"
    ),
    "ProcessPoolExecutorTest.test_max_tasks_per_child_defaults_to_spawn_context": (
        _PRIVATE.format("_mp_context")
        + "; corral's default start method is forkserver, with max_tasks_per_child or without"
    ),
    "ProcessPoolExecutorTest.test_traceback": (
        "the worker's traceback is the exception's __cause__ as corral.RemoteTraceback (its "
        "text is str(cause)), not concurrent.futures.process._RemoteTraceback"
    ),
    "ProcessPoolExecutorTest.test_python_finalization_error": (
        "makes ProcessPoolExecutor's second thread fail to start, expecting BrokenProcessPool; "
        "corral's executor starts one thread, when it is made, so nothing fails, the calls "
        "run, and mul((2, 3)) raises TypeError"
    ),
    # test_shutdown
    "ExecutorShutdownTest.test_interpreter_shutdown": _SCRIPT,
    "ExecutorShutdownTest.test_submit_after_interpreter_shutdown": _SCRIPT,
    "ExecutorShutdownTest.test_hang_gh83386": _SCRIPT,
    "ProcessPoolForkserverProcessPoolShutdownTest.test_cancel_futures": _CANCEL_ALL,
    "ProcessPoolSpawnProcessPoolShutdownTest.test_cancel_futures": _CANCEL_ALL,
    "ProcessPoolShutdownTest.test_processes_terminate": _PRIVATE.format("_processes"),
    "ProcessPoolShutdownTest.test_context_manager_shutdown": _NOT_CORRAL,
    "ProcessPoolShutdownTest.test_del_shutdown": _NOT_CORRAL,
    "ProcessPoolShutdownTest.test_shutdown_no_wait": _NOT_CORRAL,
}

# Listed tests that are not run at all, rather than run and expected to fail.
SKIPPED = frozenset(key for key, reason in DIFFERENCES.items() if reason is _NOT_CORRAL)


def _listed(test: Callable[..., Any], key: str) -> Callable[..., Any]:
    """A copy of the suite's test method, marked as a listed difference."""

    @functools.wraps(test)
    def listed(self: unittest.TestCase) -> None:
        try:
            test(self)
            return
        except unittest.SkipTest:
            raise
        except Exception as exc:
            error = AssertionError(f"{type(exc).__name__}: {exc}")
            # Its frames hold what the test made (a future holds its executor, whose
            # initargs may hold a pipe): cleared, so tearDown's collection frees them.
            traceback.clear_frames(exc.__traceback__)
        raise error

    if key in SKIPPED:
        return pytest.mark.skip(reason=DIFFERENCES[key])(listed)
    return pytest.mark.xfail(reason=DIFFERENCES[key], strict=True)(listed)


def _key(cls: type, name: str) -> str:
    """``DIFFERENCES``' key for test ``name`` of ``cls``: the suite's class defining it."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return f"{klass.__name__}.{name}"
    raise AssertionError(f"{cls.__name__} has no {name}")


# Every executor a test made: a failed test leaves its own unshut (the suite shuts down
# only self.executor), with worker processes the leak check would count.
_made: weakref.WeakSet[corral.Executor] = weakref.WeakSet()


class Executor(corral.Executor):
    """``corral.Executor``, remembered in ``_made`` for the tests' tearDown."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _made.add(self)


def _tear_down(self: Any) -> None:
    """The suite's tearDown, then shutting down every executor the test made, and dropping
    the log queue test_init's failing-initializer tests keep open (unused in this process,
    only its collection closes its pipe): the leak check counts processes and fds."""
    super(type(self), self).tearDown()
    for executor in list(_made):
        executor.shutdown(wait=True)
    _made.clear()
    vars(self).pop("log_queue", None)
    vars(self).pop("executor_kwargs", None)  # its initargs hold the queue too
    gc.collect()  # a queue is in reference cycles


def _on_corral(cls: type[unittest.TestCase]) -> type[unittest.TestCase]:
    """The suite's test class with corral's executor substituted, listed tests marked."""
    namespace: dict[str, Any] = {
        "executor_type": Executor,
        "tearDown": _tear_down,
        "__module__": __name__,
    }
    for name in unittest.TestLoader().getTestCaseNames(cls):
        for key in (f"{cls.__name__}.{name}", _key(cls, name)):
            if key in DIFFERENCES:
                namespace[name] = _listed(getattr(cls, name), key)
                break
    return type(cls.__name__, (cls,), namespace)


def _collect() -> dict[str, type[unittest.TestCase]]:
    classes: dict[str, type[unittest.TestCase]] = {}
    for module_name in MODULES:
        module = importlib.import_module(f"test.test_concurrent_futures.{module_name}")
        for name, cls in vars(module).items():
            if (
                isinstance(cls, type)
                and issubclass(cls, unittest.TestCase)
                and issubclass(cls, PROCESS_MIXINS)
            ):
                assert name not in classes, f"two of the suite's classes are named {name}"
                classes[name] = _on_corral(cls)
    return classes


globals().update(_collect())
