"""Streaming throughput: items per second from a generator running in a worker process to
a consumer in the parent, corral's ``iterate`` against the ways peers offer.

    python -m benchmarks.streaming                  # 2,000,000 items, best of 3
    python -m benchmarks.streaming --items 200000 --repeats 1

The ways measured, each carrying the same small ints:

- ``corral.iterate``: the generator runs in the worker; items come back in batches under
  credit (bounded memory on both sides).
- ``mp.Pool.imap``: the nearest stdlib way, ``multiprocessing.Pool.imap`` over a generator
  (items travel to a worker and back, chunked; the pool has no way to run a generator in a
  worker), chunksize 1024.
- ``mp.Process+Queue``: a hand-made producer process putting each item on a
  ``multiprocessing.Queue`` (unbounded unless given a size; here maxsize 10,000 to bound
  memory as corral does).
- ``mp.Process+Queue batched``: the same, putting lists of 1024 items.

Each runs in a fresh process; the report is a markdown table with items/s and the ratio to
corral. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Iterator

BATCH = 1024


def produce(n: int) -> Iterator[int]:
    yield from range(n)


def identity(x: int) -> int:
    return x


def _put_each(queue: multiprocessing.Queue[int | None], n: int) -> None:
    for i in range(n):
        queue.put(i)
    queue.put(None)


def _put_batches(queue: multiprocessing.Queue[list[int] | None], n: int) -> None:
    for start in range(0, n, BATCH):
        queue.put(list(range(start, min(n, start + BATCH))))
    queue.put(None)


def run_corral(n: int) -> float:
    import corral

    async def main() -> float:
        async with corral.Pool(1) as pool:
            start = time.perf_counter()
            count = 0
            async for _ in pool.iterate(produce, n):
                count += 1
            elapsed = time.perf_counter() - start
        assert count == n
        return elapsed

    return asyncio.run(main())


def run_pool_imap(n: int) -> float:
    with multiprocessing.get_context("forkserver").Pool(1) as pool:
        pool.apply(identity, (0,))  # started
        start = time.perf_counter()
        count = sum(1 for _ in pool.imap(identity, produce(n), chunksize=BATCH))
        elapsed = time.perf_counter() - start
    assert count == n
    return elapsed


def run_queue(n: int, batched: bool) -> float:
    ctx = multiprocessing.get_context("forkserver")
    queue = ctx.Queue(maxsize=10_000)
    start = time.perf_counter()
    process = ctx.Process(target=_put_batches if batched else _put_each, args=(queue, n))
    process.start()
    count = 0
    while (item := queue.get()) is not None:
        count += len(item) if batched else 1
    elapsed = time.perf_counter() - start
    process.join()
    assert count == n
    return elapsed


WAYS = {
    "corral.iterate": run_corral,
    "mp.Pool.imap": run_pool_imap,
    "mp.Process+Queue": lambda n: run_queue(n, batched=False),
    "mp.Process+Queue batched": lambda n: run_queue(n, batched=True),
}


def measure(way: str, n: int) -> float:
    """Items per second of one way, in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.streaming", "--one", way, "--items", str(n)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return float(done.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        elapsed = WAYS[args.one](args.items)
        print(args.items / elapsed)
        return
    best: dict[str, float] = {}
    for round_ in range(args.repeats):  # interleaved, so drifting load hits every way
        for way in WAYS:
            rate = measure(way, args.items)
            best[way] = max(best.get(way, 0.0), rate)
            print(f"round {round_ + 1}: {way}: {rate:,.0f} items/s", file=sys.stderr)
    base = best["corral.iterate"]
    print(f"| way ({args.items:,} items, best of {args.repeats}) | items/s | corral is |")
    print("|---|---:|---:|")
    for way, rate in best.items():
        ratio = "—" if way == "corral.iterate" else f"{base / rate:.2f}x"
        print(f"| {way} | {rate:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
