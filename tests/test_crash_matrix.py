"""The crash matrix of CPython's ``test_concurrent_futures.test_deadlock``, on ``Pool`` and
``Executor``: a bad object crashes its process, exits or raises while it is pickled,
unpickled or run, as the function, an argument or the result. Each case must fail only
its own call, with an error that says what went wrong, and the next call is served.

Two cells of the matrix are left out, as the standard library leaves them out: a crash
while the parent pickles the call, and a crash while the parent unpickles a result. Both
kill the caller's own process; nothing can report them.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import pytest

import corral
from tests import tasks
from tests.waits import bounded

BOUND = 60.0  # seconds: the most a call of these tests may take before it fails


def _crash() -> None:
    """Kill this process with SIGSEGV, quietly."""
    faulthandler.disable()
    os.kill(os.getpid(), signal.SIGSEGV)


def _exit() -> None:
    sys.exit(1)


def _raise() -> None:
    raise RuntimeError("raised on purpose")


def _unpicklable(action: Callable[[], None]) -> None:
    """What a bad object's unpickling calls: the action, in whichever process loads it."""
    action()


class Bad:
    """A bad object: ``action`` happens when it is pickled (``at="pickle"``) or unpickled
    (``at="unpickle"``). It is callable, so it can stand as the function too."""

    def __init__(self, action: Callable[[], None], at: str) -> None:
        self.action = action
        self.at = at

    def __reduce__(self) -> tuple[Any, ...]:
        if self.at == "pickle":
            self.action()
        return _unpicklable, (self.action,)

    def __call__(self, *args: Any) -> None:
        return None

    def __repr__(self) -> str:
        return f"<{self.action.__name__[1:]} at {self.at}>"


def _return(value: Any) -> Any:
    return value


def _return_bad(action: Callable[[], None], at: str) -> Bad:
    return Bad(action, at)


def _run(action: Callable[[], None]) -> None:
    action()


_LOST = (corral.WorkerLostError, r"killed by signal 11 \(SIGSEGV\)")
_CALL_IN_WORKER = "the call could not be serialized in the worker: unpickling failed: "
_RESULT_IN_WORKER = r"the result of _return_bad \(a tests.test_crash_matrix.Bad\) could not be "
_RESULT_IN_PARENT = "the result could not be serialized in the parent: unpickling failed: "

# case -> (function, args, the error its call fails with, what the error's message says).
CASES: dict[str, tuple[Callable[..., Any], tuple[Any, ...], type[BaseException], str]] = {
    # The function.
    "function exits at pickle": (
        Bad(_exit, "pickle"),
        (),
        corral.SerializationError,
        "the function .* could not be serialized in the parent: SystemExit: 1",
    ),
    "function raises at pickle": (
        Bad(_raise, "pickle"),
        (),
        corral.SerializationError,
        "the function .* could not be serialized in the parent: RuntimeError: raised on",
    ),
    "function crashes at unpickle": (Bad(_crash, "unpickle"), (), *_LOST),
    "function exits at unpickle": (
        Bad(_exit, "unpickle"),
        (),
        corral.SerializationError,
        _CALL_IN_WORKER + "SystemExit: 1",
    ),
    "function raises at unpickle": (
        Bad(_raise, "unpickle"),
        (),
        corral.SerializationError,
        _CALL_IN_WORKER + "RuntimeError: raised on purpose",
    ),
    # An argument.
    "argument exits at pickle": (
        _return,
        (Bad(_exit, "pickle"),),
        corral.SerializationError,
        "argument 0 of _return .* could not be serialized in the parent: SystemExit: 1",
    ),
    "argument raises at pickle": (
        _return,
        (Bad(_raise, "pickle"),),
        corral.SerializationError,
        "argument 0 of _return .* could not be serialized in the parent: RuntimeError: raised",
    ),
    "argument crashes at unpickle": (_return, (Bad(_crash, "unpickle"),), *_LOST),
    "argument exits at unpickle": (
        _return,
        (Bad(_exit, "unpickle"),),
        corral.SerializationError,
        _CALL_IN_WORKER + "SystemExit: 1",
    ),
    "argument raises at unpickle": (
        _return,
        (Bad(_raise, "unpickle"),),
        corral.SerializationError,
        _CALL_IN_WORKER + "RuntimeError: raised on purpose",
    ),
    # The call, running.
    "call crashes": (_run, (_crash,), *_LOST),
    "call exits": (_run, (_exit,), SystemExit, "^1$"),
    "call raises": (_run, (_raise,), RuntimeError, "^raised on purpose$"),
    # The result.
    "result crashes at pickle": (_return_bad, (_crash, "pickle"), *_LOST),
    "result exits at pickle": (
        _return_bad,
        (_exit, "pickle"),
        corral.SerializationError,
        _RESULT_IN_WORKER + "serialized in the worker: SystemExit: 1",
    ),
    "result raises at pickle": (
        _return_bad,
        (_raise, "pickle"),
        corral.SerializationError,
        _RESULT_IN_WORKER + "serialized in the worker: RuntimeError: raised on purpose",
    ),
    "result exits at unpickle": (
        _return_bad,
        (_exit, "unpickle"),
        corral.SerializationError,
        _RESULT_IN_PARENT + "SystemExit: 1",
    ),
    "result raises at unpickle": (
        _return_bad,
        (_raise, "unpickle"),
        corral.SerializationError,
        _RESULT_IN_PARENT + "RuntimeError: raised on purpose",
    ),
}


@pytest.mark.parametrize("case", CASES)
async def test_pool_fails_the_bad_call_only(case: str) -> None:
    """On ``Pool``, the bad call fails with its error, and the next call is served."""
    fn, args, error, match = CASES[case]
    async with corral.Pool(1, start_method="fork") as pool:
        # asyncio.timeout, not wait_for: on 3.11 wait_for awaits in a task of its own,
        # and a SystemExit raised in a task ends the event loop instead of reaching here.
        async with asyncio.timeout(BOUND):
            with pytest.raises(error, match=match):
                await pool.run(fn, *args)
        assert await bounded(pool.run(tasks.add, 1, 1), BOUND) == 2


@pytest.mark.parametrize("case", CASES)
def test_executor_fails_the_bad_call_only(case: str) -> None:
    """On ``Executor``, the bad call's future fails with its error, and the next call is
    served. (Pickling and unpickling run in the executor's own thread: an exit there used
    to end it, and the call's future never completed.)"""
    fn, args, error, match = CASES[case]
    with corral.Executor(1, start_method="fork") as executor:
        future = executor.submit(fn, *args)
        with pytest.raises(error, match=match):
            future.result(timeout=BOUND)
        assert executor.submit(tasks.add, 1, 1).result(timeout=BOUND) == 2


def test_every_cell_of_the_matrix_is_a_case() -> None:
    """The table covers every (object, action, moment) the matrix has, save the two
    crashes of the parent itself."""
    cells = {
        f"{what} {action} at {moment}"
        for what in ("function", "argument", "result")
        for action in ("crashes", "exits", "raises")
        for moment in ("pickle", "unpickle")
    }
    cells -= {"function crashes at pickle", "argument crashes at pickle"}  # the parent's
    cells -= {"result crashes at unpickle"}  # the parent's
    cells |= {"call crashes", "call exits", "call raises"}
    assert cells == set(CASES)
