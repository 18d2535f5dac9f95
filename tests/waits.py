"""Bounded waits for the tests: a bug that hangs fails its test within the bound, and the
bounds are generous, so a slow CI machine still passes. Never a fixed sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# The longest any single wait may take: far above what each needs.
BOUND = 60.0


async def bounded(awaitable: Awaitable[T], timeout: float = BOUND) -> T:
    """Await with a generous bound, so a bug that hangs fails the test instead."""
    return await asyncio.wait_for(awaitable, timeout)


async def until(predicate: Callable[[], bool], timeout: float = BOUND) -> None:
    """Wait until predicate() holds (checked every 10 ms), at most timeout seconds."""

    async def check() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(check(), timeout)


def wait_until(predicate: Callable[[], object], timeout: float = BOUND) -> None:
    """``until`` for code without an event loop: poll predicate() every 5 ms, failing the
    test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.005)
