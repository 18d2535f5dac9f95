"""What keeping stats costs per call, timed alone: ``python -m benchmarks.stats_cost``.

In the parent: the stamps at submit and hand-over, and what ``job_done`` adds (one tuple
appended, the call counter, the worker's busy time). In the worker: timing the call and
pickling ``(value, run_time)`` instead of the value. Compare the sum with a no-op round
trip (``benchmarks.peers --only latency``).
"""

from __future__ import annotations

import pickle
import timeit
from time import perf_counter

from corral._stats import Timings

N = 1_000_000


class _Job:
    __slots__ = ("run_time", "sent_at", "submitted_at")


class _Worker:
    busy_time = 0.0


def parent_ns() -> float:
    timings, job, worker = Timings(), _Job(), _Worker()
    job.run_time = 0.00001

    def per_call() -> None:
        job.submitted_at = perf_counter()
        job.sent_at = perf_counter()
        now = perf_counter()
        timings.calls += 1
        run = job.run_time
        timings.samples.append((job.submitted_at, job.sent_at, now, run))
        worker.busy_time += now - job.sent_at if run is None else run

    def nothing() -> None:
        pass

    spent = min(timeit.repeat(per_call, number=N, repeat=5))
    return (spent - min(timeit.repeat(nothing, number=N, repeat=5))) / N * 1e9


def worker_ns() -> float:
    def timed() -> bytes:
        start = perf_counter()
        value = 1
        return pickle.dumps((value, perf_counter() - start), 5)

    def untimed() -> bytes:
        return pickle.dumps(1, 5)

    spent = min(timeit.repeat(timed, number=N, repeat=5))
    return (spent - min(timeit.repeat(untimed, number=N, repeat=5))) / N * 1e9


if __name__ == "__main__":
    print(f"parent: {parent_ns():.0f} ns per call")
    print(f"worker: {worker_ns():.0f} ns per call")
