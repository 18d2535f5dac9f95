"""``workers._interrupt.raise_in``: an exception raised in another thread lands where that
thread is, inside its own ``try``, on every Python version (on 3.13 plain
``PyThreadState_SetAsyncExc`` often skips the handlers: CPython gh-139622)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from corral.workers._interrupt import raise_in
from tests.waits import BOUND


class Interrupt(Exception):
    pass


def busy_with_c_calls(running: threading.Event, seen: list[str]) -> None:
    """A loop whose every turn calls into C (the pattern 3.13's SetAsyncExc misplaces)."""
    running.set()
    deadline = time.monotonic() + BOUND
    try:
        try:
            while time.monotonic() < deadline:
                pass
        except Interrupt:
            seen.append("caught")
            return
        seen.append("never interrupted")
    finally:
        seen.append("finally")


def busy_on_one_line(running: threading.Event, seen: list[str]) -> None:
    """A loop on a single line: no new line is ever reached while it spins."""
    running.set()
    deadline = time.monotonic() + BOUND
    try:
        while time.monotonic() < deadline: pass  # noqa: E701  # fmt: skip
    except Interrupt:
        seen.append("caught")
        return
    seen.append("never interrupted")


def _run(body: Callable[[threading.Event, list[str]], None]) -> list[str]:
    seen: list[str] = []
    running = threading.Event()
    escaped: list[BaseException] = []

    def target() -> None:
        try:
            body(running, seen)
        except BaseException as exc:
            escaped.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    assert running.wait(BOUND)
    assert thread.ident is not None
    raise_in(thread.ident, Interrupt)
    thread.join(BOUND)
    assert not thread.is_alive()
    assert not escaped, f"the exception escaped the function's handlers: {escaped}"
    return seen


@pytest.mark.parametrize("body", [busy_with_c_calls, busy_on_one_line])
def test_the_exception_lands_inside_the_running_try(
    body: Callable[[threading.Event, list[str]], None],
) -> None:
    """20 times in a row, the exception is caught by the function's own ``except`` and its
    ``finally`` runs: never raised outside them."""
    for _ in range(20):
        seen = _run(body)
        assert seen[0] == "caught", seen


def test_a_withdrawn_exception_never_lands() -> None:
    """Withdrawn (None) before the thread runs on, the exception is not raised later."""
    release = threading.Event()
    outcome: list[str] = []

    def target() -> None:
        try:
            release.wait(BOUND)
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:
                pass
            outcome.append("ran to the end")
        except Interrupt:
            outcome.append("interrupted")

    thread = threading.Thread(target=target)
    thread.start()
    assert thread.ident is not None
    raise_in(thread.ident, Interrupt)
    raise_in(thread.ident, None)
    release.set()
    thread.join(BOUND)
    assert outcome == ["ran to the end"]
