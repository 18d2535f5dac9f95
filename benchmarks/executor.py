"""``corral.Executor`` against the other ``concurrent.futures`` process executors.

    python -m benchmarks.executor                  # best of 3, about 2 minutes on 2 cores
    python -m benchmarks.executor --quick          # smaller workloads, one run each
    python -m benchmarks.executor --libs corral,ppe --only latency,submit

The executors, 2 workers each, each with its library's default start method:

- ``corral``: ``corral.Executor(2)`` (forkserver; the executor's default
  ``strategy="auto", prefetch=16``: up to 16 calls in flight per worker while its calls
  are short, one at a time once they take 2 ms or more);
- ``corral-fair``: ``corral.Executor(2, strategy="fair")``: a worker is sent a call only
  when idle, a round trip per call;
- ``ppe``: ``concurrent.futures.ProcessPoolExecutor(2)`` (fork on Linux before 3.14);
- ``loky``: ``loky.ProcessPoolExecutor(2)`` (loky's own start method).

The measurements, all on blocking calls from the main thread, as executors are used:

- ``latency``: ``submit(noop).result()`` one after another, each timed alone after a
  warm-up; the median (µs).
- ``submit``: 20,000 ``submit(noop, i)`` one by one, then every ``result()`` (calls/s).
- ``map``: ``list(executor.map(noop, range(100_000), chunksize=1000))`` (calls/s). The
  standard executor sends one job per item unless given a chunksize, and at chunksize 1
  would take about half a minute here, so all three get the same ``chunksize=1000``.
- ``map1``: ``list(executor.map(noop, range(20_000)))``, the default chunksize of 1: one
  job per item (calls/s).

Every (executor, measurement) runs in a fresh process (``--one``), under a time limit, in a
process group killed afterwards; the runs are interleaved (corral, ppe, loky, corral, ...)
so that a slow spell of the shared machine falls on all of them, and each number is the
best of its runs, since noise only ever slows a run down. The report is a markdown table on
stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from ._tasks import noop
from .peers import Row, run_fresh

WORKERS = 2
LIBS = {
    "corral": "corral.Executor",
    "corral-fair": "corral.Executor fair",
    "ppe": "ProcessPoolExecutor",
    "loky": "loky",
}
MAP_CHUNKSIZE = 1000
TIMEOUT = 240  # seconds for one run


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does; ``--quick`` shrinks it."""

    latency_warmup: int = 200
    latency_calls: int = 2000
    submit_calls: int = 20_000
    map_items: int = 100_000
    map1_items: int = 20_000


FULL = Sizes()
QUICK = Sizes(
    latency_warmup=20, latency_calls=200, submit_calls=2000, map_items=10_000, map1_items=2000
)


def rows(sizes: Sizes) -> list[Row]:
    return [
        Row("latency", "median_us", "no-op submit+result, median (µs)", False),
        Row("submit", "calls_per_s", f"{sizes.submit_calls:,} submits (calls/s)", True),
        Row(
            "map",
            "calls_per_s",
            f"map of {sizes.map_items:,}, chunksize={MAP_CHUNKSIZE:,} (calls/s)",
            True,
        ),
        Row("map1", "calls_per_s", f"map of {sizes.map1_items:,}, chunksize=1 (calls/s)", True),
    ]


# -- one measurement, in a fresh process ----------------------------------------------------


def make_executor(lib: str) -> Executor:
    if lib == "corral":
        import corral

        return corral.Executor(WORKERS)
    if lib == "corral-fair":
        import corral

        return corral.Executor(WORKERS, strategy="fair")
    if lib == "ppe":
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(WORKERS)
    if lib == "loky":
        import loky  # type: ignore[import-untyped]

        executor: Executor = loky.ProcessPoolExecutor(max_workers=WORKERS)
        return executor
    raise ValueError(f"unknown library {lib!r}; choose from {sorted(LIBS)}")


def warm_up(executor: Executor) -> None:
    """Start every worker: enough concurrent calls that each executor starts all of them."""
    for future in [executor.submit(noop, i) for i in range(20 * WORKERS)]:
        future.result()


def latency(executor: Executor, sizes: Sizes) -> dict[str, Any]:
    clock = time.perf_counter_ns
    for i in range(sizes.latency_warmup):
        executor.submit(noop, i).result()
    samples = []
    for i in range(sizes.latency_calls):
        t0 = clock()
        executor.submit(noop, i).result()
        samples.append(clock() - t0)
    return {"median_us": statistics.median(samples) / 1e3}


def submit(executor: Executor, sizes: Sizes) -> dict[str, Any]:
    n = sizes.submit_calls
    t0 = time.perf_counter()
    futures = [executor.submit(noop, i) for i in range(n)]
    results = [future.result() for future in futures]
    elapsed = time.perf_counter() - t0
    assert results == list(range(n))
    return {"calls_per_s": n / elapsed}


def map_(executor: Executor, sizes: Sizes, n: int, chunksize: int) -> dict[str, Any]:
    items = list(range(n))
    t0 = time.perf_counter()
    results = list(executor.map(noop, items, chunksize=chunksize))
    elapsed = time.perf_counter() - t0
    assert results == items
    return {"calls_per_s": n / elapsed}


def measure_one(lib: str, measurement: str, sizes: Sizes) -> dict[str, Any]:
    executor = make_executor(lib)
    try:
        warm_up(executor)
        if measurement == "latency":
            return latency(executor, sizes)
        if measurement == "submit":
            return submit(executor, sizes)
        if measurement == "map":
            return map_(executor, sizes, sizes.map_items, MAP_CHUNKSIZE)
        if measurement == "map1":
            return map_(executor, sizes, sizes.map1_items, 1)
        raise ValueError(f"unknown measurement {measurement!r}")
    finally:
        executor.shutdown(wait=True)


# -- the runner -----------------------------------------------------------------------------


def run_one(lib: str, measurement: str, quick: bool) -> dict[str, Any]:
    """One fresh process; its JSON line, or {"problem": ...}."""
    cmd = [sys.executable, "-m", "benchmarks.executor", "--one", lib, measurement]
    if quick:
        cmd.append("--quick")
    return run_fresh(cmd, TIMEOUT)


def fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def report(
    results: dict[tuple[str, str], list[float]], libs: list[str], only: list[str], sizes: Sizes
) -> str:
    higher = {row.measurement: row.higher_is_better for row in rows(sizes)}
    best = {
        key: max(values) if higher[key[1]] else min(values)
        for key, values in results.items()
        if values
    }
    titles = [LIBS[lib] for lib in libs]
    lines = [
        "| measurement | better | " + " | ".join(titles) + " |",
        "|---|---|" + "---|" * len(libs),
    ]
    for row in rows(sizes):
        if row.measurement not in only:
            continue
        base = best.get(("corral", row.measurement))
        cells = []
        for lib in libs:
            value = best.get((lib, row.measurement))
            if value is None:
                cells.append("failed")
            elif lib == "corral" or base is None:
                cells.append(fmt(value))
            else:
                cells.append(f"{fmt(value)} ({value / base:.2g}x)")
        better = "higher" if row.higher_is_better else "lower"
        lines.append(f"| {row.label} | {better} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: the best run, and in brackets its ratio to corral's.")
    targets = []
    mine = best.get(("corral", "latency"))
    peers = [(best[lib, "latency"], lib) for lib in libs if (lib, "latency") in best]
    peers = [(value, lib) for value, lib in peers if not lib.startswith("corral")]
    if mine is not None and peers:
        value, lib = min(peers)
        targets.append(
            f"- latency <= best peer ({LIBS[lib]} {fmt(value)} µs): corral {fmt(mine)} µs, "
            f"{value / mine:.2f}x: {'met' if mine <= value else 'MISSED'}"
        )
    ppe = best.get(("ppe", "submit"))
    for lib in ("corral", "corral-fair"):
        mine = best.get((lib, "submit"))
        if mine is not None and ppe is not None:
            targets.append(
                f"- submits >= 3x ProcessPoolExecutor, {LIBS[lib]}: {mine / ppe:.2f}x: "
                f"{'met' if mine >= 3 * ppe else 'MISSED'}"
            )
    if targets:
        lines += ["", "Targets:", *targets]
    return "\n".join(lines)


def describe_machine() -> str:
    import concurrent.futures

    import loky

    import corral

    return (
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}; corral {corral.__version__}, loky {loky.__version__}, "
        f"concurrent.futures of Python {platform.python_version()} "
        f"({concurrent.futures.__name__})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workloads, one run each")
    parser.add_argument("--repeats", type=int, default=None, help="runs per cell (default 3)")
    parser.add_argument("--libs", default=",".join(LIBS), help=f"from {','.join(LIBS)}")
    parser.add_argument("--only", default="latency,submit,map,map1", help="measurements")
    parser.add_argument("--one", nargs=2, metavar=("LIB", "MEASUREMENT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.one:
        result = measure_one(args.one[0], args.one[1], sizes)
        print(json.dumps(result), flush=True)
        return
    libs = [lib for lib in args.libs.split(",") if lib]
    only = [m for m in args.only.split(",") if m]
    repeats = args.repeats or (1 if args.quick else 3)
    results: dict[tuple[str, str], list[float]] = {(lib, m): [] for lib in libs for m in only}
    metric = {row.measurement: row.metric for row in rows(sizes)}
    for measurement in only:
        for run in range(repeats):
            for lib in libs:
                print(f"{measurement} {lib} run {run + 1}/{repeats} ...", file=sys.stderr)
                result = run_one(lib, measurement, args.quick)
                if "problem" in result:
                    print(f"  {result['problem']}", file=sys.stderr)
                    continue
                value = result[metric[measurement]]
                print(f"  {fmt(value)}", file=sys.stderr)
                results[lib, measurement].append(value)
    print(
        f"`python -m benchmarks.executor{' --quick' if args.quick else ''}`: {describe_machine()}"
    )
    print()
    print(report(results, libs, only, sizes))


if __name__ == "__main__":
    main()
