"""The operations every measurement needs, written once over three ways of driving a pool.

``Adapter`` is the contract; ``AsyncAdapter`` (awaited in the event loop: corral,
aiomultiprocess, ``ProcessPoolExecutor`` through ``run_in_executor``), ``FutureAdapter``
(blocking on ``concurrent.futures``-like handles) and ``AsyncResultAdapter``
(``multiprocessing.Pool``'s API) implement what their libraries share; ``_libs`` holds one
adapter per library.
"""

from __future__ import annotations

import abc
import asyncio
import importlib.util
import multiprocessing
import platform
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar, Literal

WORKERS = 2


@dataclass(frozen=True)
class Outcome:
    """What became of a submitted call, and when (``time.monotonic_ns``) it was seen."""

    kind: Literal["value", "error", "lost"]
    detail: str
    at_ns: int
    value: Any = None


def _error(exc: BaseException) -> Outcome:
    name = type(exc).__name__
    inner = getattr(exc, "exc", None)  # billiard hands over ExceptionWithTraceback(exc)
    if isinstance(inner, BaseException):
        name += f" wrapping {type(inner).__name__}"
    return Outcome("error", name, time.monotonic_ns())


def _lost(timeout: float) -> Outcome:
    return Outcome("lost", f"no answer within {timeout:g} s", time.monotonic_ns())


def _value(value: Any) -> Outcome:
    return Outcome("value", repr(value), time.monotonic_ns(), value)


class Adapter(abc.ABC):
    """The few operations the measurements need, on top of one library's pool."""

    key: ClassVar[str]  # the name on the command line
    title: ClassVar[str]  # the name in the table
    module: ClassVar[str]  # the import that must succeed
    dist: ClassVar[str | None]  # the distribution whose version to report; None: Python's
    # A dying worker breaks the whole pool: the user must see the error and recreate it.
    breaks_on_death: ClassVar[bool] = False
    recovery: ClassVar[str] = ""  # what recover() does, in words, for the notes
    # The library can give one call a hard time limit (submit_limited).
    time_limits: ClassVar[bool] = False
    # The git revision measured (``corral@REV``, see _revisions); None: what is installed.
    revision: ClassVar[str | None] = None
    # The library has an imap (results streamed as they come, in order or not).
    has_imap: ClassVar[bool] = False
    # Beside its submit, the library has a call that is a coroutine (run_many).
    runs_coroutines: ClassVar[bool] = False

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec(cls.module) is not None

    @classmethod
    def version(cls) -> str:
        if cls.dist is None:
            return f"Python {platform.python_version()}"
        try:
            return version(cls.dist)
        except PackageNotFoundError:
            return "?"

    @property
    @abc.abstractmethod
    def start_method(self) -> str:
        """The start method the pool actually uses."""

    @abc.abstractmethod
    async def start(self, workers: int = WORKERS) -> None:
        """Construct the pool (and start it, where the library has such a step)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Shut the pool down without waiting on work that may never finish."""

    @abc.abstractmethod
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One call, waited for."""

    @abc.abstractmethod
    async def call_many(
        self, fn: Callable[..., Any], arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        """Submit every call individually, then wait for all of them."""

    @abc.abstractmethod
    async def map(self, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        """The library's own map, with its default chunking."""

    @abc.abstractmethod
    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Start one call without waiting; returns the library's handle."""

    @abc.abstractmethod
    async def outcome(self, handle: Any, timeout: float) -> Outcome:
        """Wait at most ``timeout`` seconds for a handle from ``submit``."""

    async def run_many(
        self, fn: Callable[..., Any], arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        """Every call as a coroutine, all gathered (only where runs_coroutines)."""
        raise NotImplementedError

    async def imap(
        self, fn: Callable[..., Any], items: Sequence[Any], *, ordered: bool
    ) -> list[Any]:
        """The library's own imap, default chunking, every result taken as it comes (only
        where has_imap)."""
        raise NotImplementedError

    async def recover(self) -> None:
        """Make the pool serve again after a worker died (only where it breaks)."""
        raise NotImplementedError

    def submit_limited(self, fn: Callable[..., Any], *args: Any, limit: float) -> Any:
        """Start one call with a hard time limit of ``limit`` seconds (where time_limits)."""
        raise NotImplementedError

    async def wait_readable(self, fd: int, timeout: float) -> bool:
        """Block until ``fd`` is readable: a blocking library has nothing else to run."""
        return bool(select.select([fd], [], [], timeout)[0])


class AsyncAdapter(Adapter):
    """A library driven by awaiting in the event loop; waiting must not block the loop."""

    async def wait_readable(self, fd: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)
        return True

    async def outcome(self, handle: Any, timeout: float) -> Outcome:
        try:
            value = await asyncio.wait_for(handle, timeout)
        except TimeoutError as exc:
            # wait_for cancels the handle when time runs out: one that is done and not
            # cancelled failed with a TimeoutError of its own (a time limit, say).
            if asyncio.isfuture(handle) and handle.done() and not handle.cancelled():
                return _error(exc)
            return _lost(timeout)
        except Exception as exc:
            return _error(exc)
        return _value(value)


class FutureAdapter(Adapter):
    """A blocking library whose handles are ``concurrent.futures.Future``-like."""

    async def outcome(self, handle: Any, timeout: float) -> Outcome:
        try:
            value = handle.result(timeout)
        except TimeoutError as exc:
            if handle.done():  # the call failed with a TimeoutError: pebble's time limit
                return _error(exc)
            return _lost(timeout)
        except Exception as exc:
            return _error(exc)
        return _value(value)


class AsyncResultAdapter(Adapter):
    """A blocking library with ``multiprocessing.Pool``'s API: ``apply``, ``apply_async``
    (handles with ``get(timeout)``) and ``map`` (multiprocessing, mpire, billiard)."""

    pool: Any
    has_imap = True

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.apply(fn, args)

    async def imap(
        self, fn: Callable[..., Any], items: Sequence[Any], *, ordered: bool
    ) -> list[Any]:
        method = self.pool.imap if ordered else self.pool.imap_unordered
        return list(method(fn, items))

    async def call_many(
        self, fn: Callable[..., Any], arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        results = [self.pool.apply_async(fn, args) for args in arglists]
        return [result.get() for result in results]

    async def map(self, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        return list(self.pool.map(fn, items))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.apply_async(fn, args)

    async def outcome(self, handle: Any, timeout: float) -> Outcome:
        try:
            value = handle.get(timeout)
        except (TimeoutError, multiprocessing.TimeoutError) as exc:
            if handle.ready():  # the call itself failed with a TimeoutError
                return _error(exc)
            return _lost(timeout)
        except Exception as exc:
            return _error(exc)
        return _value(value)
