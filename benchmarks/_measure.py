"""One measurement of one library, run in a fresh process by ``benchmarks.peers``.

``python benchmarks/_script.py LIB MEASUREMENT [--functions main|module] [--quick]
[--loop uvloop]`` prints one JSON line: ``{"metrics": {...}, "notes": [...],
"start_method": ..., "version": ...}``. A fresh process per measurement keeps one
library's leftovers (threads, forkservers, warm caches, a broken pool) from touching the
next measurement.

The measurements of ``VARIED`` call the functions of ``_tasks.CALLS`` from where
``--functions`` says: the script's own ``__main__`` (``_script``), as most programs define
their tasks, or the importable ``_tasks``. Every task makes its result (a new int, new
bytes, a new array), so no library can answer with something it cached.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from . import _tasks
from ._adapter import WORKERS, Adapter, Outcome
from ._floor import PipeFloor
from ._libs import adapter
from ._revisions import import_corral_from

MiB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does; ``--quick`` shrinks it for a smoke run."""

    latency_warmup: int = 200
    latency_calls: int = 2000
    latency_budget: float = 2.0
    submit_calls: int = 20_000
    map_items: int = 100_000
    payload_mib: int = 64
    payload_tries: int = 3
    sleep_tasks: int = 200
    busy_tasks: int = 200
    busy_seconds: float = 0.1
    death_timeout: float = 3.0
    time_limit: float = 0.2
    limit_runs: int = 5
    replace_runs: int = 5


FULL = Sizes()
QUICK = Sizes(
    latency_warmup=20,
    latency_calls=200,
    latency_budget=1.0,
    submit_calls=2_000,
    map_items=5_000,
    payload_mib=16,
    payload_tries=2,
    sleep_tasks=20,
    busy_tasks=20,
    death_timeout=1.0,
    limit_runs=3,
    replace_runs=3,
)

Result = dict[str, Any]


def _ms(ns: int) -> float:
    return ns / 1e6


# Latency samples alternate between the library and the pipe floor in blocks this long,
# so a slow spell of the machine falls on both: short enough to interleave finely, long
# enough that each side stays warm within its block.
FLOOR_BLOCK = 20


async def latency(lib: Adapter, sizes: Sizes, tasks: ModuleType) -> Result:
    """Sequential awaited (or blocking) calls of ``add_one``, each timed on its own, and
    beside them the raw pipe floor (``_floor``) in the same process, block by block, both
    blocked in ``read`` and awaited on the loop.

    Warm-up and sampling stop early after a time budget (keeping at least 100 samples) so
    that a library that answers in milliseconds does not stretch the run.
    """
    clock = time.perf_counter_ns
    floor = PipeFloor()  # forked before the pool exists: no threads to fork yet
    try:
        await lib.start()
        deadline = clock() + int(sizes.latency_budget * 1e9 / 4)
        for i in range(sizes.latency_warmup):
            await lib.call(tasks.add_one, i)
            floor.call(tasks.add_one, i)
            await floor.call_on_loop(tasks.add_one, i)
            if clock() > deadline:
                break
        samples: list[int] = []
        floor_samples: list[int] = []
        loop_floor_samples: list[int] = []
        deadline = clock() + int(sizes.latency_budget * 1e9)
        while len(samples) < sizes.latency_calls:
            for i in range(len(samples), len(samples) + FLOOR_BLOCK):
                t0 = clock()
                y = await lib.call(tasks.add_one, i)
                samples.append(clock() - t0)
                assert y == i + 1, "a wrong result"
            for i in range(FLOOR_BLOCK):
                t0 = clock()
                floor.call(tasks.add_one, i)
                floor_samples.append(clock() - t0)
            for i in range(FLOOR_BLOCK):
                t0 = clock()
                await floor.call_on_loop(tasks.add_one, i)
                loop_floor_samples.append(clock() - t0)
            if clock() > deadline and len(samples) >= 100:
                break
    finally:
        floor.close()
    return {
        "median_us": statistics.median(samples) / 1e3,
        "p99_us": _p99(samples) / 1e3,
        "calls": len(samples),
        "floor_median_us": statistics.median(floor_samples) / 1e3,
        "floor_p99_us": _p99(floor_samples) / 1e3,
        "loop_floor_median_us": statistics.median(loop_floor_samples) / 1e3,
    }


def _p99(samples: list[int]) -> int:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def submit(lib: Adapter, sizes: Sizes, tasks: ModuleType) -> Result:
    """Submit many tiny calls one by one, then wait for them all: per-call overhead in bulk.

    Written the library's usual way (``call_many``: corral's ``submit`` then a gather of
    the jobs, ``apply_async``, ``submit``, ...), and, where the library also has a call
    that is a coroutine (corral: ``asyncio.gather(*(pool.run(...)))``), that way too.
    """
    await lib.start()
    n = sizes.submit_calls
    arglists = [(i,) for i in range(n)]
    expected = [i + 1 for i in range(n)]
    shapes = {"calls_per_s": lib.call_many}
    if lib.runs_coroutines:
        shapes["run_calls_per_s"] = lib.run_many
    for many in shapes.values():
        await many(tasks.add_one, arglists[:20])  # warm-up
    metrics: Result = {}
    for key, many in shapes.items():
        t0 = time.perf_counter()
        results = await many(tasks.add_one, arglists)
        elapsed = time.perf_counter() - t0
        assert results == expected, "results out of order or missing"
        metrics[key] = n / elapsed
    return metrics


async def map_(lib: Adapter, sizes: Sizes, tasks: ModuleType) -> Result:
    """The library's own map over many tiny calls, chunked the library's default way."""
    await lib.start()
    await lib.map(tasks.add_one, list(range(100)))  # not call(): mpire's map fails after apply
    n = sizes.map_items
    items = list(range(n))
    t0 = time.perf_counter()
    results = await lib.map(tasks.add_one, items)
    elapsed = time.perf_counter() - t0
    assert results == [x + 1 for x in items], "results out of order or missing"
    return {"calls_per_s": n / elapsed}


async def imap(lib: Adapter, sizes: Sizes, tasks: ModuleType) -> Result:
    """The library's own imap over many tiny calls, default chunking, every result consumed
    as it comes: in input order, then as they finish (``imap_unordered``)."""
    await lib.start()
    await lib.map(tasks.add_one, list(range(100)))
    n = sizes.map_items
    items = list(range(n))
    expected = [x + 1 for x in items]
    metrics: Result = {}
    notes: list[str] = []
    for key, ordered in (("ordered_per_s", True), ("unordered_per_s", False)):
        t0 = time.perf_counter()
        try:
            results = await lib.imap(tasks.add_one, items, ordered=ordered)
        except Exception as exc:  # one way failing (mpire's unordered) leaves the other's
            metrics[f"{key}_why"] = "fails"
            way = "imap" if ordered else "unordered imap"
            notes.append(f"{way} raised {type(exc).__name__}: {exc}")
            continue
        elapsed = time.perf_counter() - t0
        assert (results if ordered else sorted(results)) == expected, "results wrong or missing"
        metrics[key] = n / elapsed
    return {"metrics": metrics, "notes": notes}


async def payload(lib: Adapter, sizes: Sizes, tasks: ModuleType) -> Result:
    """Move one large object as the argument, then as the result; best of a few. Bytes,
    then a float64 NumPy array of the same size (where numpy is installed).

    Each argument is made afresh before its call, outside the timing; each result is made
    by the task (``make_bytes``, ``make_array``), inside it: filling 64 MiB is part of what
    every library's call then costs, as it is in a program.
    """
    nbytes = sizes.payload_mib * MiB
    notes: list[str] = []
    kinds: list[tuple[str, Any, Any]] = [("", _tasks.make_bytes, tasks.make_bytes)]
    if importlib.util.find_spec("numpy") is None:
        notes.append("numpy is not installed: no ndarray rows")
    else:
        kinds.append(("array_", _tasks.make_array, tasks.make_array))
    await lib.start()
    await lib.call(tasks.size_of, b"warm")
    for _, _, make in kinds:
        # Slow enough that every worker gets one: each imports numpy (to unpickle an array
        # argument too) and warms its allocator before the timed calls.
        await lib.call_many(make, [(nbytes,)] * (2 * WORKERS))
    metrics: Result = {}
    for prefix, make_here, make_there in kinds:
        best_arg = best_result = float("inf")
        for _ in range(sizes.payload_tries):
            data = make_here(nbytes)
            t0 = time.perf_counter()
            size = await lib.call(tasks.size_of, data)
            best_arg = min(best_arg, time.perf_counter() - t0)
            assert size == nbytes
            del data
            t0 = time.perf_counter()
            result = await lib.call(make_there, nbytes)
            best_result = min(best_result, time.perf_counter() - t0)
            assert memoryview(result).nbytes == nbytes
            del result
        metrics[f"{prefix}arg_mib_s"] = sizes.payload_mib / best_arg
        metrics[f"{prefix}result_mib_s"] = sizes.payload_mib / best_result
    return {"metrics": metrics, "notes": notes}


async def overhead(lib: Adapter, sizes: Sizes, tasks: ModuleType) -> Result:
    """CPU-bound tasks of 100 ms (``busy``), submitted one by one: the worker time lost per
    task, ``(workers x wall time - CPU time spent in the tasks) / tasks``.

    Zero for a pool that keeps every worker busy from the first task to the last; every
    gap between a worker's tasks, and every cycle the parent takes from the workers (2 of
    them on a 2-core machine), counts.
    """
    n = sizes.busy_tasks
    await lib.start()
    await lib.call_many(tasks.add_one, [(i,) for i in range(20)])
    t0 = time.perf_counter()
    spent = await lib.call_many(tasks.busy, [(sizes.busy_seconds,)] * n)
    wall = time.perf_counter() - t0
    return {
        "overhead_ms": (WORKERS * wall - sum(spent)) / n * 1e3,
        "wall_s": wall,
        "ideal_s": sum(spent) / WORKERS,
    }


def ideal_efficiency(durations: list[float], workers: int = WORKERS) -> float:
    """Efficiency of greedy list scheduling in submission order with zero overhead (%).

    No pool that takes tasks in order can beat this: the last long tasks leave a worker
    idle at the end however fast the pool is.
    """
    free = [0.0] * workers
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return 100 * sum(durations) / (workers * max(free))


async def efficiency(lib: Adapter, sizes: Sizes, tasks: ModuleType) -> Result:
    """Uneven sleeping tasks: the share of worker time spent in tasks, not waiting for them."""
    durations = _tasks.durations(sizes.sleep_tasks)
    await lib.start()
    await lib.call_many(_tasks.noop, [()] * 20)
    t0 = time.perf_counter()
    spent = await lib.call_many(_tasks.sleep_for, [(d,) for d in durations])
    wall = time.perf_counter() - t0
    return {
        "efficiency_pct": 100 * sum(spent) / (WORKERS * wall),
        "ideal_pct": ideal_efficiency(durations),
    }


async def death(lib: Adapter, sizes: Sizes, tasks: ModuleType) -> Result:
    """A task kills its worker: how soon the caller hears of it, and is served again.

    The task writes CLOCK_MONOTONIC into a FIFO just before ``os._exit``, which dates the
    death. Where a death leaves the pool working, the next call goes in at once; where it
    breaks the pool, the caller first needs the error, then recreates the pool (the least
    that serves again; closing the broken pool is left for later and not timed).
    """
    notes: list[str] = []
    fifo = os.path.join(tempfile.mkdtemp(prefix="corral-bench-"), "death")
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        await lib.start()
        await lib.call_many(_tasks.noop, [()] * 4)
        handle = lib.submit(_tasks.die, fifo)
        if not await lib.wait_readable(fd, sizes.death_timeout):
            raise RuntimeError("the task did not die")
        died_ns = int(os.read(fd, 64))

        if lib.breaks_on_death:
            fate = await lib.outcome(handle, sizes.death_timeout)
            await lib.recover()
            notes.append(f"to be served again: {lib.recovery}")
            await lib.call(_tasks.noop)
            served_ns = time.monotonic_ns()
        else:
            await lib.call(_tasks.noop)
            served_ns = time.monotonic_ns()
            remaining = sizes.death_timeout - (time.monotonic_ns() - died_ns) / 1e9
            fate = await lib.outcome(handle, max(0.0, remaining))
    finally:
        os.close(fd)
        os.unlink(fifo)
        os.rmdir(os.path.dirname(fifo))

    metrics: Result = {"served_ms": _ms(served_ns - died_ns), "fate": fate.kind}
    if fate.kind == "error":
        metrics["error_ms"] = _ms(fate.at_ns - died_ns)
        metrics["error"] = fate.detail
    elif fate.kind == "lost":
        notes.append(
            f"the dying task's caller never hears of it (waited {sizes.death_timeout:g} s)"
        )
    return {"metrics": metrics, "notes": notes}


class Fifo:
    """A named pipe through which tasks tell the parent the time (CLOCK_MONOTONIC ns).

    The parent holds a write end of its own, so that the pipe never reads as closed between
    tasks: readable means a task has written.
    """

    def __init__(self, name: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="corral-bench-")
        self.path = os.path.join(self.dir, name)
        os.mkfifo(self.path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._keep = os.open(self.path, os.O_WRONLY)
        self._pending = b""

    async def read(self, lib: Adapter, timeout: float) -> list[int] | None:
        """The numbers of the next line (or the next write, for ``_tasks.die``); None on
        timeout."""
        if not self._pending and not await lib.wait_readable(self.fd, timeout):
            return None
        self._pending += os.read(self.fd, 4096)
        line, _, self._pending = self._pending.partition(b"\n")
        return [int(x) for x in line.split()]

    def close(self) -> None:
        os.close(self._keep)
        os.close(self.fd)
        os.unlink(self.path)
        os.rmdir(self.dir)


def _gone(pid: int) -> bool:
    """True once process ``pid`` has ended (exited or a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in (b"Z", b"X")


async def _served(lib: Adapter, timeout: float) -> Outcome:
    """A ``getpid`` call, bounded by ``timeout`` even for a blocking library."""
    return await lib.outcome(lib.submit(_tasks.getpid), timeout)


async def limit(lib: Adapter, sizes: Sizes, tasks: ModuleType) -> Result:
    """A task stuck far past its hard time limit: how late its caller hears of it.

    ``_tasks.stall`` writes its start (CLOCK_MONOTONIC, read inside the worker) and its pid
    into a FIFO, then sleeps 30 s. The number is (the caller gets its error) minus (the
    task's start + the limit): median of a few stuck tasks in one pool, one after another,
    each submitted once the pool has served a call again and after a pause of 0-1 s (seeded),
    so that a library that checks its limits on a timer is not always caught at the same
    point of its period. Also recorded: how long from
    submitting to the task's start, and whether the stuck worker was gone (dead, or a
    zombie) within 2 s of the error.
    """
    if not lib.time_limits:
        raise RuntimeError(f"{lib.title} has no per-call time limit")
    limit_s = sizes.time_limit
    wait = 3.0  # how long past the limit the caller waits for its error
    notes: list[str] = []
    metrics: Result = {"limit_s": limit_s}
    late: list[float] = []
    delays: list[float] = []
    killed = 0
    pauses = random.Random(4).uniform
    fifo = Fifo("limit")
    try:
        await lib.start()
        await lib.call_many(_tasks.noop, [()] * 4)
        for _ in range(sizes.limit_runs):
            if (await _served(lib, wait)).kind != "value":
                notes.append(f"after a stuck call was stopped, none was served in {wait:g} s")
                break
            await asyncio.sleep(pauses(0.0, 1.0))
            submitted_ns = time.monotonic_ns()
            handle = lib.submit_limited(_tasks.stall, fifo.path, 30.0, limit=limit_s)
            fate = await lib.outcome(handle, limit_s + wait)
            line = await fifo.read(lib, 1.0)
            if line is None:
                raise RuntimeError("the stuck task never started")
            started_ns, pid = line
            delays.append(_ms(started_ns - submitted_ns))
            if fate.kind != "error":
                metrics["late_ms_why"] = "no error"
                notes.append(
                    f"the stuck call had not failed {wait:g} s past its {limit_s:g} s limit"
                    f" ({fate.detail})"
                )
                break
            metrics["error"] = fate.detail
            late.append(_ms(fate.at_ns - started_ns) - limit_s * 1e3)
            deadline = time.monotonic() + 2.0
            while not _gone(pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            killed += _gone(pid)
    finally:
        fifo.close()
    if delays:
        metrics["start_delay_ms"] = statistics.median(delays)
    if late:
        metrics["late_ms"] = statistics.median(late)
        metrics["late_max_ms"] = max(late)
        metrics["runs"] = len(late)
        metrics["killed"] = f"{killed}/{len(late)}"
        if killed < len(late):
            notes.append(f"a stuck worker outlived its error by 2 s ({len(late) - killed} times)")
    return {"metrics": metrics, "notes": notes}


async def replace(lib: Adapter, sizes: Sizes, tasks: ModuleType) -> Result:
    """A pool of ONE worker whose task kills it: how soon a new process serves a call.

    ``_tasks.die`` writes the time into a FIFO and calls ``os._exit(1)``. The next call
    (``getpid``) goes in at once and is timed from that death to its answer; it must come
    from a process other than the dead one. The dying call's fate is recorded (bounded by
    ``death_timeout``). Median of a few deaths in one pool, one after another, each after
    a pause of 0-1 s (seeded; see ``limit``).
    """
    if not lib.time_limits:
        raise RuntimeError(f"{lib.title} is not measured here")
    notes: list[str] = []
    metrics: Result = {}
    served: list[float] = []
    errors: list[str] = []
    pauses = random.Random(4).uniform
    fifo = Fifo("replace")
    try:
        await lib.start(workers=1)
        pid = await lib.call(_tasks.getpid)
        for _ in range(sizes.replace_runs):
            await asyncio.sleep(pauses(0.0, 1.0))
            handle = lib.submit(_tasks.die, fifo.path)
            line = await fifo.read(lib, sizes.death_timeout)
            if line is None:
                raise RuntimeError("the task did not die")
            died_ns = line[0]
            answer = await _served(lib, sizes.death_timeout)
            if answer.kind != "value":
                metrics["served_ms_why"] = "hangs"
                notes.append(
                    f"after its only worker died the pool served no call within"
                    f" {sizes.death_timeout:g} s ({answer.kind}: {answer.detail})"
                )
                break
            if answer.value == pid:
                raise RuntimeError("the call after the death was served by the dead process")
            pid = answer.value
            served.append(_ms(answer.at_ns - died_ns))
            remaining = sizes.death_timeout - (time.monotonic_ns() - died_ns) / 1e9
            fate = await lib.outcome(handle, max(0.0, remaining))
            errors.append(fate.detail if fate.kind == "error" else fate.kind)
    finally:
        fifo.close()
    if served:
        metrics["served_ms"] = statistics.median(served)
        metrics["served_max_ms"] = max(served)
        metrics["runs"] = len(served)
    if errors:
        metrics["error"] = ", ".join(sorted(set(errors)))
        if "lost" in errors:
            notes.append(
                f"the dying call's caller never heard of it in {errors.count('lost')} of"
                f" {len(errors)} deaths (waited {sizes.death_timeout:g} s)"
            )
    return {"metrics": metrics, "notes": notes}


async def startup(lib: Adapter, sizes: Sizes, tasks: ModuleType) -> Result:
    """From constructing the pool to the first served call, in a process that never had one."""
    t0 = time.perf_counter()
    await lib.start()
    assert await lib.call(tasks.add_one, 1) == 2
    return {"startup_ms": (time.perf_counter() - t0) * 1e3}


# Each takes the adapter, the sizes, and the module whose functions of _tasks.CALLS it calls.
MEASUREMENTS: dict[str, Callable[[Adapter, Sizes, ModuleType], Awaitable[Result]]] = {
    "latency": latency,
    "submit": submit,
    "map": map_,
    "imap": imap,
    "payload": payload,
    "overhead": overhead,
    "efficiency": efficiency,
    "death": death,
    "startup": startup,
    "limit": limit,
    "replace": replace,
}
# Measured with the functions of the script's __main__ as well as of a module (--functions):
# the ones whose calls a user writes. The others run _tasks's own helpers (dying, stalling).
VARIED = ("latency", "submit", "map", "imap", "payload", "overhead", "startup")
FUNCTIONS = ("main", "module")
# Measured only for the libraries with a per-call hard time limit (Adapter.time_limits),
# and not part of the default run: name them with --only.
LIMITED = ("limit", "replace")


async def _run(lib: Adapter, name: str, sizes: Sizes, tasks: ModuleType, src: Path | None) -> None:
    """Measure, print the JSON line, stop. ``src``: where a pinned corral must come from."""
    result = await MEASUREMENTS[name](lib, sizes, tasks)
    if "metrics" not in result:
        result = {"metrics": result, "notes": []}
    if src is not None:
        # A number said to be corral@REV's must be REV's code, in the parent and a worker.
        worker = await lib.call(_tasks.module_file, "corral")  # not a str if wires differ
        files = [str(sys.modules["corral"].__file__), str(worker)]
        strays = [f for f in files if not Path(f).is_relative_to(src)]
        if strays:
            raise RuntimeError(f"{lib.title}: corral came from {strays}, not from {src}")
    result["start_method"] = lib.start_method
    result["version"] = lib.version()
    print(json.dumps(result), flush=True)
    # The result is out; shutting down must not hang the run (a pool may wait for a lost
    # task): the alarm's default action ends this process, and the runner kills the rest.
    signal.alarm(5)
    await lib.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("lib", type=adapter, help="a library, or corral@REV")
    parser.add_argument("measurement", choices=list(MEASUREMENTS))
    parser.add_argument(
        "--functions",
        choices=FUNCTIONS,
        default="module",
        help="call the functions of __main__ (the script run) or of benchmarks._tasks",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args(argv)
    if args.functions == "main" and args.measurement not in VARIED:
        parser.error(f"{args.measurement} calls only functions of benchmarks._tasks")
    tasks = _tasks if args.functions == "module" else sys.modules["__main__"]
    missing = [name for name in _tasks.CALLS if not callable(getattr(tasks, name, None))]
    if missing:
        parser.error(f"__main__ lacks {', '.join(missing)}: run benchmarks/_script.py")
    lib = args.lib()
    # Before anything imports corral: nothing above does.
    src = import_corral_from(lib.revision) if lib.revision else None
    sizes = QUICK if args.quick else FULL
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(_run(lib, args.measurement, sizes, tasks, src))
    else:
        asyncio.run(_run(lib, args.measurement, sizes, tasks, src))
    sys.stdout.flush()
    # Skip interpreter clean-up: some libraries join their workers at exit.
    os._exit(0)
