"""The functions the benchmarks run in worker processes.

They live in an importable module, so that every library pickles them by reference, the
same few bytes for all. ``_script`` defines the same calls again in the measuring process's
``__main__``, where users define theirs (the ``__main__`` rows of the report); ``CALLS``
names those, and both modules define each. aiomultiprocess runs only coroutine functions,
so each task has an ``async`` twin that does exactly the same (blocking) work.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

# The calls that ``_script`` defines again in ``__main__``, with their async twins.
CALLS = ("add_one", "size_of", "make_bytes", "make_array", "busy")


def noop(x: Any = None) -> Any:
    """Return the argument: the smallest call that still proves a round trip."""
    return x


def add_one(x: int) -> int:
    """A tiny call whose result the task makes (a new int), as a user's function does."""
    return x + 1


def size_of(data: Any) -> int:
    """Take a large argument (bytes, or a contiguous ndarray) and answer with its size."""
    return memoryview(data).nbytes


def make_bytes(nbytes: int) -> bytes:
    """Answer a tiny argument with ``nbytes`` of bytes made by this call (never cached: a
    library cannot reuse what it sent last time). Filling them is part of the call."""
    return b"\xa5" * nbytes


def make_array(nbytes: int) -> Any:
    """Answer with a new float64 ndarray of ``nbytes``. numpy is imported here, not at the
    top, so that a worker that runs this module anew does not pay for it."""
    import numpy

    return numpy.arange(nbytes // 8, dtype=numpy.float64)


def busy(seconds: float) -> float:
    """Burn ``seconds`` of this thread's CPU time; return the CPU time it took.

    CPU-bound on purpose: every cycle the pool's parent spends per task is then taken from
    the workers (2 workers on 2 cores), as users with CPU-bound work pay it, where a
    sleeping task would leave the cores idle and hide it.
    """
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass
    return time.thread_time() - start


def sleep_for(seconds: float) -> float:
    """Occupy the worker for ``seconds`` (without burning a shared core); return the time taken.

    ``time.sleep`` blocks the worker as CPU-bound work would, but leaves the noisy machine's
    cores to the parent, so the measurement shows the pool's scheduling and not contention.
    """
    start = time.perf_counter()
    time.sleep(seconds)
    return time.perf_counter() - start


def die(fifo: str) -> None:
    """Tell the parent the time of death through ``fifo``, then kill this worker abruptly.

    ``time.monotonic_ns`` reads CLOCK_MONOTONIC, one clock for all processes on Linux, so the
    parent can subtract it from its own reading.
    """
    fd = os.open(fifo, os.O_WRONLY)
    os.write(fd, str(time.monotonic_ns()).encode())
    os._exit(1)


def stall(fifo: str, seconds: float) -> None:
    """Write ``"<CLOCK_MONOTONIC ns> <pid>\\n"`` into ``fifo``, then sleep far past any limit.

    The line dates the task's start from inside the worker and names the process, so the
    parent can see how long after the limit it heard, and whether the worker was killed.
    """
    fd = os.open(fifo, os.O_WRONLY)
    os.write(fd, f"{time.monotonic_ns()} {os.getpid()}\n".encode())
    os.close(fd)
    time.sleep(seconds)


def getpid() -> int:
    """The worker's process id: which process served a call."""
    return os.getpid()


def module_file(name: str) -> str:
    """Where the worker's module ``name`` came from: proves which corral a worker runs."""
    return str(sys.modules[name].__file__)


async def anoop(x: Any = None) -> Any:
    """``noop`` for aiomultiprocess."""
    return noop(x)


async def aadd_one(x: int) -> int:
    """``add_one`` for aiomultiprocess."""
    return add_one(x)


async def asize_of(data: Any) -> int:
    """``size_of`` for aiomultiprocess."""
    return size_of(data)


async def amake_bytes(nbytes: int) -> bytes:
    """``make_bytes`` for aiomultiprocess."""
    return make_bytes(nbytes)


async def amake_array(nbytes: int) -> Any:
    """``make_array`` for aiomultiprocess."""
    return make_array(nbytes)


async def abusy(seconds: float) -> float:
    """``busy`` for aiomultiprocess."""
    return busy(seconds)


async def asleep_for(seconds: float) -> float:
    """``sleep_for`` for aiomultiprocess: it blocks the child's loop, as real work would."""
    return sleep_for(seconds)


async def adie(fifo: str) -> None:
    """``die`` for aiomultiprocess."""
    die(fifo)


async def astall(fifo: str, seconds: float) -> None:
    """``stall`` for aiomultiprocess."""
    stall(fifo, seconds)


async def agetpid() -> int:
    """``getpid`` for aiomultiprocess."""
    return getpid()


ASYNC_TWIN: dict[Callable[..., Any], Callable[..., Any]] = {
    noop: anoop,
    add_one: aadd_one,
    size_of: asize_of,
    make_bytes: amake_bytes,
    make_array: amake_array,
    busy: abusy,
    sleep_for: asleep_for,
    die: adie,
    stall: astall,
    getpid: agetpid,
}


def durations(n: int, seed: int = 20240601) -> list[float]:
    """``n`` task lengths drawn uniformly from 0-200 ms, the same list for every library."""
    rng = random.Random(seed)
    return [rng.uniform(0.0, 0.2) for _ in range(n)]
