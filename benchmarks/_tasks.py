"""The functions the benchmarks run in worker processes.

They live in an importable module (not ``__main__``) so that every library pickles them by
reference, the same few bytes for all. aiomultiprocess runs only coroutine functions, so
each task has an ``async`` twin that does exactly the same (blocking) work.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

_blobs: dict[int, bytes] = {}


def noop(x: Any = None) -> Any:
    """Return the argument: the smallest call that still proves a round trip."""
    return x


def size_of(data: bytes) -> int:
    """Take a large argument and answer with a tiny result."""
    return len(data)


def blob(nbytes: int) -> bytes:
    """Answer a tiny argument with ``nbytes`` of bytes.

    The bytes are made on the first call and cached in the worker, so timed calls measure
    moving the result, not making it.
    """
    data = _blobs.get(nbytes)
    if data is None:
        data = _blobs[nbytes] = random.Random(nbytes).randbytes(nbytes)
    return data


def sleep_then_blob(seconds: float, nbytes: int) -> None:
    """Make and cache ``blob(nbytes)`` in this worker, slowly enough that others get a turn."""
    blob(nbytes)
    time.sleep(seconds)


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


async def asize_of(data: bytes) -> int:
    """``size_of`` for aiomultiprocess."""
    return size_of(data)


async def ablob(nbytes: int) -> bytes:
    """``blob`` for aiomultiprocess."""
    return blob(nbytes)


async def asleep_then_blob(seconds: float, nbytes: int) -> None:
    """``sleep_then_blob`` for aiomultiprocess."""
    sleep_then_blob(seconds, nbytes)


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
    size_of: asize_of,
    blob: ablob,
    sleep_then_blob: asleep_then_blob,
    sleep_for: asleep_for,
    die: adie,
    stall: astall,
    getpid: agetpid,
}


def durations(n: int, seed: int = 20240601) -> list[float]:
    """``n`` task lengths drawn uniformly from 0-200 ms, the same list for every library."""
    rng = random.Random(seed)
    return [rng.uniform(0.0, 0.2) for _ in range(n)]
