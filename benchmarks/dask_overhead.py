"""What corral adds on top of Dask: the same calls sent to one ``distributed.LocalCluster``
with plain ``client.submit`` and through a ``TaskQueue`` served by a ``DaskWorker``.

    python -m benchmarks.dask_overhead                  # 1000 calls, 2 workers, 7 repeats
    python -m benchmarks.dask_overhead --calls 200 --repeats 3

The ways measured, on the same cluster and client, alternating, for each kind of call
(``noop``: returns its argument; ``sleep``: sleeps 10 ms):

- ``client.submit``: ``client.gather([client.submit(f, i, pure=False) for i ...])``: every
  task on the cluster at once, results fetched together.
- ``corral prefetch``: ``queue.submit`` for each call to a ``TaskQueue`` with one
  ``DaskWorker`` under ``strategy="prefetch"`` with a capacity of every call, so Dask sees
  every task at once, as above; each job is awaited on its own.
- ``corral fair``: the same to a queue with one ``DaskWorker`` per Dask thread under
  ``strategy="fair"``: Dask sees one task per thread, corral holds the rest (and orders
  them), and each job costs a round trip.

The queues and their workers are made once, before the timing: it measures what each call
costs, not the start of a queue.

The machine's noise easily moves one run by a third, so every way runs ``--repeats`` times,
the ways alternating; the report is a markdown table of the best and the median time,
calls/s at the best, and each time over ``client.submit``'s (best against best, median
against median) in percent. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

SLEEP = 0.01


def noop(x: int) -> int:
    return x


def nap(x: int) -> int:
    time.sleep(SLEEP)
    return x


async def plain(client: Any, fn: Callable[[int], int], n: int) -> list[int]:
    futures = [client.submit(fn, i, pure=False) for i in range(n)]
    return list(await client.gather(futures))


async def through_corral(queue: Any, fn: Callable[[int], int], n: int) -> list[int]:
    return list(await asyncio.gather(*(queue.submit(fn, i) for i in range(n))))


async def timed(run: Callable[[], Awaitable[list[int]]], n: int) -> float:
    start = time.perf_counter()
    result = await run()
    took = time.perf_counter() - start
    assert result == list(range(n)), "wrong results"
    return took


async def measure(calls: int, workers: int, threads: int, repeats: int) -> str:
    from distributed import Client, LocalCluster

    import corral
    from corral.workers import DaskWorker

    rows = []
    slots = workers * threads
    async with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=True,
            dashboard_address=":0",
            asynchronous=True,
        ) as cluster,
        Client(cluster, asynchronous=True) as client,
        corral.TaskQueue(strategy="prefetch", prefetch=calls) as prefetching,
        corral.TaskQueue(strategy="fair") as fair,
    ):
        await prefetching.attach(DaskWorker(client))
        await asyncio.gather(*(fair.attach(DaskWorker(client)) for _ in range(slots)))
        for queue in (prefetching, fair):  # warm up the workers and connections
            await through_corral(queue, noop, 100)
        await plain(client, noop, 100)
        ways: dict[str, Callable[[Callable[[int], int], int], Awaitable[list[int]]]] = {
            "client.submit": lambda fn, n: plain(client, fn, n),
            "corral prefetch": lambda fn, n: through_corral(prefetching, fn, n),
            "corral fair": lambda fn, n: through_corral(fair, fn, n),
        }
        for label, fn in (("noop", noop), (f"sleep {SLEEP * 1000:g} ms", nap)):
            times: dict[str, list[float]] = {way: [] for way in ways}
            for _ in range(repeats):  # alternate the ways, so drift hits each alike
                for way, run in ways.items():
                    took = await timed(lambda run=run, fn=fn: run(fn, calls), calls)
                    times[way].append(took)
                    print(f"{label:>12} {way:<16} {took:7.3f} s", file=sys.stderr)
            best = {way: min(t) for way, t in times.items()}
            median = {way: statistics.median(t) for way, t in times.items()}
            for way in ways:
                over = (
                    ""
                    if way == "client.submit"
                    else f"{(best[way] / best['client.submit'] - 1) * 100:+.0f}% / "
                    f"{(median[way] / median['client.submit'] - 1) * 100:+.0f}%"
                )
                rows.append(
                    f"| {label} | {way} | {best[way]:.2f} | {median[way]:.2f} "
                    f"| {calls / best[way]:,.0f} | {over} |"
                )
    header = (
        f"{calls} calls, LocalCluster of {workers} worker processes x {threads} thread(s), "
        f"{repeats} repeats\n\n"
        "| calls | way | best s | median s | calls/s | over client.submit (best / median) |\n"
        "|---|---|---:|---:|---:|---:|"
    )
    return "\n".join([header, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(asyncio.run(measure(args.calls, args.workers, args.threads, args.repeats)))


if __name__ == "__main__":
    main()
