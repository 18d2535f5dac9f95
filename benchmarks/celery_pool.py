"""Celery's worker pool: corral's (``corral.celery:TaskPool``) against prefork.

    python -m benchmarks.celery_pool                 # 3 rounds, about a minute on 2 cores
    python -m benchmarks.celery_pool --rounds 1 --noops 1000 --pauses 200

One Redis server (``redis-server`` on a free loopback port, no persistence) is broker and
result backend for every run; the app is ``tests/celery_app.py``. Each round starts a
``celery worker`` at concurrency 2 on each pool in turn (corral, prefork, interleaved so
that a slow spell of the shared machine falls on both) and measures:

- ``no-op tasks/s``: N ``noop`` tasks are published to a queue the worker does not consume
  yet; then the worker is told to consume it (``add_consumer``), and the clock runs until
  every result is in the backend (one ``EXISTS`` of all the result keys every 5 ms). The
  client's own sending is outside the measurement: this is the worker's rate.
- ``10 ms tasks/s``: the same with ``pause(0.01)`` (ideal: 200/s at concurrency 2).
- ``death -> FAILURE``: a ``pause(30)`` task is started; the child running it (its pid from
  ``inspect active``) is sent SIGKILL; the time is from the kill to the ``date_done`` the
  worker records with the task's ``WorkerLostError``. The median of 5 deaths.

Each number is the best of its rounds (the death time: the median over all rounds), since
noise only slows a run down. The report is a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POOLS = {
    "corral": ("--pool", "custom"),
    "prefork": ("--pool", "prefork"),
}
CONCURRENCY = 2
DEATHS = 5
BOUND = 120.0  # seconds any one wait may take


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Any, what: str, timeout: float = BOUND, step: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(step)


@contextlib.contextmanager
def redis_server(directory: str) -> Iterator[str]:
    port = _free_port()
    server = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", directory),
        ],
        stdout=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    try:
        _wait(up, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait()


@contextlib.contextmanager
def worker(pool: str, url: str, directory: str) -> Iterator[str]:
    """A worker on pool consuming a queue of its own; yields its node name."""
    name = f"{pool}-{uuid.uuid4().hex[:6]}@bench"
    log = Path(directory) / f"{name}.log"
    env = {
        **os.environ,
        "CORRAL_CELERY_REDIS": url,
        "CELERY_CUSTOM_WORKER_POOL": "corral.celery:TaskPool",
    }
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker"),
            *POOLS[pool],
            *("-c", str(CONCURRENCY), "-n", name, "-Q", f"home-{name}", "-l", "info"),
            *("--logfile", str(log), "--without-gossip", "--without-mingle"),
            "--without-heartbeat",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(lambda: log.exists() and "ready." in log.read_text(), f"{pool} worker", step=0.05)
        yield name
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(BOUND)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rate(app: Any, name: str, task: str, args: tuple[Any, ...], n: int) -> float:
    """Tasks per second through the worker name: see the module docstring."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    ids = [app.send_task(f"tests.celery_app.{task}", args, queue=queue).id for _ in range(n)]
    keys = [f"celery-task-meta-{i}" for i in ids]
    redis = app.backend.client
    start = time.perf_counter()
    app.control.add_consumer(queue, destination=[name], reply=True, timeout=BOUND)
    _wait(lambda: redis.exists(*keys) == n, f"{n} {task} results")
    took = time.perf_counter() - start
    app.control.cancel_consumer(queue, destination=[name], reply=True, timeout=BOUND)
    return n / took


def death_to_failure(app: Any, name: str) -> float:
    """Seconds from SIGKILL of the child running a task to its failure's date_done."""
    queue = f"home-{name}"
    result = app.send_task("tests.celery_app.pause", (30,), queue=queue)
    _wait(lambda: result.state == "STARTED", "the task to start")
    active = app.control.inspect(destination=[name], timeout=BOUND).active()[name]
    (running,) = [request for request in active if request["id"] == result.id]
    killed = datetime.datetime.now(datetime.UTC)
    os.kill(int(running["worker_pid"]), signal.SIGKILL)
    _wait(lambda: result.state == "FAILURE", "the failure to be recorded")
    done = result.date_done
    if done.tzinfo is None:
        done = done.replace(tzinfo=datetime.UTC)
    # A new child takes the place of the dead one before the next measurement.
    _wait(lambda: len(_children(app, name)) == CONCURRENCY, "the replacement", step=0.05)
    return float((done - killed).total_seconds())


def _children(app: Any, name: str) -> list[int]:
    stats = app.control.inspect(destination=[name], timeout=BOUND).stats()
    return list(stats[name]["pool"]["processes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--noops", type=int, default=3000)
    parser.add_argument("--pauses", type=int, default=400)
    options = parser.parse_args()
    from celery import Celery

    best: dict[str, dict[str, float]] = {p: {"noop": 0.0, "pause": 0.0} for p in POOLS}
    deaths: dict[str, list[float]] = {p: [] for p in POOLS}
    with tempfile.TemporaryDirectory() as directory, redis_server(directory) as url:
        app = Celery("bench", broker=url, backend=url)
        for round_ in range(options.rounds):
            for pool in POOLS:
                with worker(pool, url, directory) as name:
                    rate(app, name, "noop", (), 100)  # warm-up
                    noop = rate(app, name, "noop", (), options.noops)
                    pause = rate(app, name, "pause", (0.01,), options.pauses)
                    died = [death_to_failure(app, name) for _ in range(DEATHS)]
                best[pool]["noop"] = max(best[pool]["noop"], noop)
                best[pool]["pause"] = max(best[pool]["pause"], pause)
                deaths[pool].extend(died)
                print(
                    f"round {round_ + 1} {pool}: {noop:,.0f} no-ops/s, {pause:,.0f} 10 ms/s, "
                    f"deaths {', '.join(f'{d * 1000:.0f}' for d in died)} ms",
                    file=sys.stderr,
                )
        app.close()
    corral, prefork = best["corral"], best["prefork"]
    death = {p: statistics.median(d) * 1000 for p, d in deaths.items()}
    print(
        f"\nconcurrency {CONCURRENCY}, {options.noops:,} no-ops, {options.pauses} 10 ms tasks, "
        f"best of {options.rounds}; death: median of {DEATHS * options.rounds}\n"
    )
    print("| pool | no-op tasks/s | 10 ms tasks/s | death -> FAILURE recorded (ms) |")
    print("|---|---:|---:|---:|")
    for pool in POOLS:
        b = best[pool]
        print(f"| {pool} | {b['noop']:,.0f} | {b['pause']:,.1f} | {death[pool]:.1f} |")
    print(
        f"| corral / prefork | {corral['noop'] / prefork['noop']:.2f}x | "
        f"{corral['pause'] / prefork['pause']:.2f}x | "
        f"{death['corral'] / death['prefork']:.3f}x |"
    )


if __name__ == "__main__":
    main()
