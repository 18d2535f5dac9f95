"""Bounded waits for the tests: a bug that hangs fails its test within the bound, and the
bounds are generous, so a slow CI machine still passes. Never a fixed sleep."""

from __future__ import annotations

import asyncio
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
