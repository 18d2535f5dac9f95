"""``Tracker``: wait for a set of awaitables without touching what they return.

A caller that fires off work and keeps only some of the handles (a coroutine per request,
a job per chunk) still needs to know when the work is finished: to bound how much is in
flight, or to drain it before closing. ``Tracker`` counts what is not done yet and wakes its
waiters as that count falls. It never reads a value or an exception: the owner of a future
still gets its outcome, and asyncio still warns about an exception that nobody retrieved.

Each tracked future has one done-callback; waiters sleep on futures of their own, which the
callback resolves. Nothing polls. A waiter that is cancelled cancels only its own future,
never a tracked one.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from ._checks import check_count

T = TypeVar("T")


class Tracker:
    """Awaitables put in, counted until done; ``all``, ``any`` and ``until_fewer`` wait.

    A tracker belongs to the event loop running when it is first used. An awaitable that
    fails or is cancelled counts as done, like one that returns.
    """

    __slots__ = ("_any", "_fewer", "_loop", "_pending", "_sequence")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        # Each pending future with its sequence number, in the order put: ``any`` waits for
        # one put no later than its mark, so a later ``put`` cannot wake it.
        self._pending: dict[asyncio.Future[Any], int] = {}
        self._sequence = 0
        self._fewer: dict[asyncio.Future[None], int] = {}  # waiter -> wake below this count
        self._any: dict[asyncio.Future[None], int] = {}  # waiter -> its sequence mark

    def __len__(self) -> int:
        """How many tracked awaitables are not done yet.

        One counts until its done-callback runs, which asyncio schedules on the loop pass
        after it finishes.
        """
        return len(self._pending)

    def __repr__(self) -> str:
        return f"<Tracker pending={len(self._pending)}>"

    def put(self, awaitable: Awaitable[T]) -> asyncio.Future[T]:
        """Track awaitable; return the future that stands for it, to await for its value.

        A coroutine becomes a task, so it runs; a future or task is returned as it is; any
        other awaitable (a ``Job``) is wrapped in a task. Raises ``TypeError`` for what is
        not awaitable, and ``RuntimeError`` outside this tracker's event loop.
        """
        given: object = awaitable  # the annotation is a promise the caller may break
        if not inspect.isawaitable(given):
            hint = " (call it: put(fn(...)))" if inspect.iscoroutinefunction(given) else ""
            raise TypeError(
                f"Tracker.put() takes a coroutine, a Task, a Future or another awaitable, "
                f"not {given!r}{hint}"
            )
        loop = self._bind()
        future = asyncio.ensure_future(awaitable)
        if future.get_loop() is not loop:
            raise RuntimeError(f"cannot track {future!r}: it belongs to another event loop")
        if not future.done() and future not in self._pending:
            self._sequence += 1
            self._pending[future] = self._sequence
            future.add_done_callback(self._on_done)  # the one callback per tracked future
        return future

    async def all(self) -> None:
        """Wait until every tracked awaitable is done, including those put meanwhile."""
        if self._pending:
            await self._wait(self._fewer, 1)

    async def any(self) -> None:
        """Wait until one of the awaitables pending now is done; at once if there are none.

        Those put while it waits do not count.
        """
        if self._pending:
            await self._wait(self._any, self._sequence)

    def until_fewer(self, n: int) -> Coroutine[Any, Any, None]:
        """Wait until fewer than n tracked awaitables are pending: a bound on work in flight.

        Checks n at the call: ``ValueError`` unless it is a positive int.
        """
        try:
            check_count("n", n)
        except ValueError:
            raise ValueError(f"until_fewer(n) needs a positive int, got n={n!r}") from None
        return self._until_fewer(n)

    async def _until_fewer(self, n: int) -> None:
        if len(self._pending) >= n:
            await self._wait(self._fewer, n)

    async def _wait(self, waiters: dict[asyncio.Future[None], int], key: int) -> None:
        waiter = self._bind().create_future()
        waiters[waiter] = key
        try:
            await waiter  # cancelling the awaiting task cancels this future, nothing else
        finally:
            waiters.pop(waiter, None)

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(
                "this Tracker belongs to another event loop; make one Tracker per loop"
            )
        return loop

    def _on_done(self, future: asyncio.Future[Any]) -> None:
        # Only bookkeeping: reading future.result() or .exception() here would mark its
        # exception retrieved, and hide it from the owner who forgot to look.
        sequence = self._pending.pop(future)
        left = len(self._pending)
        for waiter, n in list(self._fewer.items()):
            if left < n:
                del self._fewer[waiter]
                if not waiter.done():  # a cancelled waiter is already done
                    waiter.set_result(None)
        for waiter, mark in list(self._any.items()):
            if sequence <= mark:
                del self._any[waiter]
                if not waiter.done():
                    waiter.set_result(None)
