"""``workers._interrupt.raise_in``: an exception raised in another thread lands where that
thread is, inside its own ``try``, on every Python version (on 3.13 plain
``PyThreadState_SetAsyncExc`` often skips the handlers: CPython gh-139622)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import corral
from corral._interrupt import raise_in
from tests import tasks
from tests.waits import BOUND, bounded, until


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
        if body is busy_with_c_calls:
            assert seen[-1] == "finally", seen


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


# -- in a worker process: the signal handlers' exceptions ----------------------------------


def busy_until_interrupted(seconds: float) -> str:
    """Spin calling into C; report whether the task's own handlers saw the interrupt."""
    deadline = time.monotonic() + seconds
    try:
        try:
            while time.monotonic() < deadline:
                pass
        except corral.SoftTimeLimitExceeded as exc:
            return f"caught {exc.limit:g}"
        return "never interrupted"
    finally:
        corral.report("finally ran")


def busy_recording_cleanup(seconds: float, started: str, cleaned: str) -> None:
    # The mark is made inside the try: a cancel sent once it exists lands where the
    # finally covers it (made before, a cancel landing between it and the try, on a slow
    # machine, would rightly skip the finally).
    deadline = time.monotonic() + seconds
    try:
        Path(started).touch()
        while time.monotonic() < deadline:
            pass
    finally:
        tasks.write_atomically(cleaned, str(os.getpid()))


async def test_a_soft_limit_lands_inside_a_busy_task() -> None:
    """A process task spinning on calls into C catches its soft limit in its own
    ``except`` and its ``finally`` runs, 10 times in a row (on 3.13 an exception raised
    straight from the signal handler skipped them most times)."""
    async with corral.Pool(1) as pool:
        for _ in range(10):
            job = pool.submit(busy_until_interrupted, BOUND, soft_time_limit=0.05)
            assert await bounded(job) == "caught 0.05"
            assert [obj async for obj in job.reports()] == ["finally ran"]


async def test_a_soft_limit_ends_a_sleep_in_c() -> None:
    """A task sleeping in C gets its soft limit within a second, inside its ``try``."""
    async with corral.Pool(1) as pool:
        started = time.monotonic()
        outcome = await bounded(
            pool.run(tasks.sleep_catching_soft_limit, BOUND, soft_time_limit=0.1)
        )
        assert outcome == "cleaned up after 0.1"
        assert time.monotonic() - started < 1 + 0.1


async def test_a_cancelled_busy_task_runs_its_finally_and_the_worker_lives(
    tmp_path: Path,
) -> None:
    """Cancelling a process task spinning on calls into C runs its ``finally`` in the
    same worker, which is not killed (the interrupt was not lost) and serves again."""
    async with corral.Pool(1) as pool:
        for i in range(5):
            started, cleaned = str(tmp_path / f"started{i}"), str(tmp_path / f"cleaned{i}")
            job = pool.submit(busy_recording_cleanup, BOUND, started, cleaned)
            await until(lambda: os.path.exists(started))  # noqa: B023
            job.cancel()
            with pytest.raises(asyncio.CancelledError):
                await bounded(job)
            await until(lambda: os.path.exists(cleaned))  # noqa: B023
            pid = int(Path(cleaned).read_text())
            assert await bounded(pool.run(os.getpid)) == pid
