"""No-op round trips of a function defined in the program's own ``__main__``, against the
same from an importable module and a lambda, in one pool, interleaved so that drift hits all
three alike. Run it as users run their scripts::

    .venv/bin/python -m benchmarks.main_functions [--calls 2000] [--rounds 5]

With ``PYTHONPATH=CHECKOUT/src`` it measures another checkout of corral (an A/B).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import corral
from benchmarks import _tasks


def noop(x: Any = None) -> Any:
    """The same no-op as ``_tasks.noop``, defined in ``__main__``."""
    return x


async def _per_call(pool: corral.Pool, fn: Callable[[Any], Any], calls: int) -> float:
    """Microseconds per sequential round trip, after a warm-up."""
    for _ in range(200):
        await pool.run(fn, 1)
    start = time.perf_counter()
    for _ in range(calls):
        await pool.run(fn, 1)
    return (time.perf_counter() - start) / calls * 1e6


async def _main(calls: int, rounds: int) -> None:
    functions: dict[str, Callable[[Any], Any]] = {
        "__main__ function": noop,
        "module function": _tasks.noop,
        "lambda": lambda x: x,
    }
    times: dict[str, list[float]] = {name: [] for name in functions}
    async with corral.Pool(1) as pool:
        for _ in range(rounds):
            for name, fn in functions.items():
                times[name].append(await _per_call(pool, fn, calls))
    print(f"corral from {corral.__file__}")
    for name, values in times.items():
        print(
            f"{name:18} median {statistics.median(values):6.1f} us  "
            f"(best {min(values):.1f}, worst {max(values):.1f})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    asyncio.run(_main(options.calls, options.rounds))
