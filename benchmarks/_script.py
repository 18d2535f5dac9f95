"""The main module of every measuring process: a script, written as users write theirs.

``benchmarks.peers`` runs ``python benchmarks/_script.py LIB MEASUREMENT --functions
main|module ...`` (by path, as users run a script), which measures through ``_measure``.
The functions below are the calls of ``_tasks.CALLS`` defined again here, in the
program's own ``__main__``, as most programs define their tasks: ``--functions main``
measures with these, ``--functions module`` with ``_tasks``'s, in the same kind of process,
so the two rows differ only in where the function lives.

A worker started by spawn or forkserver runs this file again as ``__mp_main__`` (its main
block skipped) to find these functions by name, so the top of the file imports only the
standard library: a worker pays no more for it than for a user's small script.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def add_one(x: int) -> int:
    """``_tasks.add_one``, defined in ``__main__``."""
    return x + 1


def size_of(data: Any) -> int:
    """``_tasks.size_of``, defined in ``__main__``."""
    return memoryview(data).nbytes


def make_bytes(nbytes: int) -> bytes:
    """``_tasks.make_bytes``, defined in ``__main__``."""
    return b"\xa5" * nbytes


def make_array(nbytes: int) -> Any:
    """``_tasks.make_array``, defined in ``__main__`` (numpy imported at the call)."""
    import numpy

    return numpy.arange(nbytes // 8, dtype=numpy.float64)


def busy(seconds: float) -> float:
    """``_tasks.busy``, defined in ``__main__``."""
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass
    return time.thread_time() - start


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


ASYNC_TWIN: dict[Callable[..., Any], Callable[..., Any]] = {
    add_one: aadd_one,
    size_of: asize_of,
    make_bytes: amake_bytes,
    make_array: amake_array,
    busy: abusy,
}


if __name__ == "__main__":
    # Binds no name of the measuring code here: corral's forkserver preloads the modules
    # that the main module holds, and those of a user's script are the user's own.
    import importlib

    importlib.import_module("benchmarks._measure").main()
