"""A soak under chaos (not in CI): ``python -m benchmarks.soak --jobs 1000000``.

Short jobs on a few workers while about ``--kill-rate`` of them, as they complete, draw an
outside SIGKILL of a worker going off 0-5 ms later, so at any moment of a worker's life:
running a job, idle, or still starting (a share of the kills aim at a worker in its first
milliseconds). One job in ``--exit-every`` calls ``os._exit`` itself. It runs once per
``--retries`` value.

Each job appends a line to a ledger file as it starts and another as it ends (one
O_APPEND write each), so the ledger says how often each job began, whichever process ran
it. It proves:

- every job completed (its result is its number) or failed with ``WorkerLostError``;
- with ``retries=0`` a completed job began exactly once and a lost one at most once: none
  ran again, silently or not; with retries a job began at most ``retries + 1`` times;
- the jobs that call ``os._exit`` fail with ``WorkerLostError`` carrying their exit code;
- the parent's fds, its child processes and the entries of /dev/shm come back to where
  they were.

The chaos options make the stress test's storms too (``tests/test_stress.py`` runs two of
them in CI); ``--runs`` repeats a configuration, for races that show once in many runs::

    python -m benchmarks.soak --jobs 1500 --workers 8 --max-tasks-per-child 1 \\
        --nap 0.05 --kill-every 0.001 0.006 --exit-every 0 --retries 0 --runs 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil

import corral

# Jobs submitted ahead of the results: enough to keep every worker fed, few enough that a
# million jobs never sit in memory at once.
WINDOW = 4096

# A kill goes off this long at most after the job that drew it was submitted.
MAX_DELAY = 0.005

# Of the kills, the share aimed at a worker still starting (its first milliseconds).
STARTING_SHARE = 0.3

# Long-lived helpers multiprocessing and corral start once; not leaks.
HELPERS = ("forkserver", "resource_tracker", "corral-undertaker")


def job(ledger: str, i: int, exit_code: int, seconds: float = 0.0) -> int:
    """The soak's job: exit with exit_code if it is not 0; else record its start in the
    ledger, sleep seconds, and record its end."""
    if exit_code:
        os._exit(exit_code)
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"s{i}\n".encode())
        if seconds:
            time.sleep(seconds)
        os.write(fd, f"e{i}\n".encode())
    finally:
        os.close(fd)
    return i


def nap(max_seconds: float) -> None:
    """Initializer: a slow start-up of 0 to max_seconds."""
    time.sleep(random.uniform(0, max_seconds))


@dataclass
class Footprint:
    """What the parent holds: its fds, its children (helpers aside), /dev/shm's entries."""

    fds: int
    children: frozenset[int]
    shm: frozenset[str]

    @classmethod
    def now(cls) -> Footprint:
        children = set()
        for child in psutil.Process().children(recursive=True):
            try:
                if not any(h in " ".join(child.cmdline()) for h in HELPERS):
                    children.add(child.pid)
            except psutil.Error:
                continue
        shm = frozenset(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else frozenset()
        return cls(len(os.listdir("/proc/self/fd")), frozenset(children), shm)


@dataclass
class Outcome:
    retries: int
    jobs: int
    seconds: float
    completed: int
    lost: int
    exits: int
    other: list[str]
    reruns: int  # jobs that began more than once (only with retries)
    twice_bad: int  # jobs that began more often than retries allow
    kills: int
    leaked: str

    @property
    def ok(self) -> bool:
        return not (self.other or self.twice_bad or self.leaked)

    def line(self) -> str:
        return (
            f"retries={self.retries}: {self.jobs:,} jobs in {self.seconds:.1f} s "
            f"({self.jobs / self.seconds:,.0f} jobs/s), {self.kills:,} outside SIGKILLs; "
            f"completed {self.completed:,}, WorkerLostError {self.lost:,} "
            f"(of them {self.exits:,} os._exit jobs), other {len(self.other)}, "
            f"began again after a death {self.reruns:,}, began too often {self.twice_bad}, "
            f"leaks: {self.leaked or 'none'} -> {'OK' if self.ok else 'FAILED'}"
        )


async def soak(args: argparse.Namespace, retries: int, seed: int) -> Outcome:
    rng = random.Random(seed)
    before = Footprint.now()
    ledger = tempfile.mktemp(prefix="corral-soak-", suffix=".ledger")
    outcomes: dict[int, object] = {}
    exiting = set()
    kills = 0
    pending: set[asyncio.Future[object]] = set()
    room = asyncio.Event()  # set when the window has room again
    options: dict[str, object] = {}
    if args.nap:
        options.update(initializer=nap, initargs=(args.nap,))
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    async with corral.Pool(
        args.workers, max_tasks_per_child=args.max_tasks_per_child, **options
    ) as pool:

        def settle(i: int, future: asyncio.Future[object]) -> None:
            pending.discard(future)
            outcomes[i] = future.exception() or future.result()
            if len(pending) <= WINDOW // 2:
                room.set()
            if not args.kill_every and rng.random() < args.kill_rate:
                # Drawn as jobs complete, which spreads the kills over the run; the delay
                # lets one land at any moment of a worker's life.
                loop.call_later(rng.uniform(0, MAX_DELAY), kill)

        def kill() -> None:
            nonlocal kills
            workers = pool.stats().workers
            starting = [w.pid for w in workers if w.state == "starting" and w.pid]
            victims = starting if starting and rng.random() < STARTING_SHARE else []
            victims = victims or [w.pid for w in workers if w.pid]
            if victims:
                try:
                    os.kill(rng.choice(victims), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass

        async def chaos(every: tuple[float, float]) -> None:
            while True:
                await asyncio.sleep(rng.uniform(*every))
                kill()

        monkey = asyncio.create_task(chaos(args.kill_every)) if args.kill_every else None
        try:
            for i in range(args.jobs):
                code = 0
                if args.exit_every and rng.randrange(args.exit_every) == 0:
                    code = 3
                    exiting.add(i)
                future = pool.submit(job, ledger, i, code, args.run_for, retries=retries).future
                pending.add(future)
                future.add_done_callback(lambda f, i=i: settle(i, f))
                if len(pending) >= WINDOW:
                    room.clear()
                    await room.wait()
            while pending:
                await asyncio.wait(set(pending))
        finally:
            if monkey is not None:
                monkey.cancel()
    seconds = time.perf_counter() - started

    lines = Path(ledger).read_text().split()
    began = Counter(int(line[1:]) for line in lines if line[0] == "s")
    os.unlink(ledger)
    completed = {i for i, o in outcomes.items() if o == i}
    lost = {i for i, o in outcomes.items() if isinstance(o, corral.WorkerLostError)}
    ended = completed | lost
    other = [f"job {i}: {o!r}" for i, o in outcomes.items() if i not in ended]
    other += [f"job {i}: no outcome" for i in range(args.jobs) if i not in outcomes]
    other += [f"job {i} ran os._exit, yet {outcomes[i]!r}" for i in exiting - lost]
    other += [
        f"job {i}: {outcomes[i]!r}"
        for i in exiting
        if i in lost and getattr(outcomes[i], "exitcode", None) != 3
    ]
    other += [f"job {i} completed, never began" for i in completed if not began[i]]
    twice_bad = sum(1 for n in began.values() if n > retries + 1)
    reruns = sum(1 for n in began.values() if n > 1)

    leaked = ""
    deadline = time.monotonic() + 10
    while True:
        after = Footprint.now()
        children = after.children - before.children
        shm = after.shm - before.shm
        fds = after.fds - before.fds
        if not (children or shm or fds > 0) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    if children or shm or fds > 0:
        leaked = f"{fds} fds, children {sorted(children)}, /dev/shm {sorted(shm)}"
    return Outcome(
        retries,
        args.jobs,
        seconds,
        len(completed),
        len(lost),
        len(exiting & lost),
        other,
        reruns,
        twice_bad,
        kills,
        leaked,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--kill-rate", type=float, default=0.01, help="share of jobs that draw a kill"
    )
    parser.add_argument(
        "--kill-every",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="instead of --kill-rate: seconds between kills, drawn uniformly (a storm)",
    )
    parser.add_argument("--exit-every", type=int, default=2000, help="0: no job exits")
    parser.add_argument("--retries", type=int, nargs="+", default=[0, 2])
    parser.add_argument(
        "--run-for",
        type=float,
        default=0.0,
        help="seconds each job takes: a job of a few microseconds is rarely the one running "
        "when a kill lands; a longer one often is",
    )
    parser.add_argument("--max-tasks-per-child", type=int, default=None)
    parser.add_argument("--nap", type=float, default=0.0, help="initializer sleeps 0..NAP s")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rate = asyncio.run(_rate(args.workers))
    print(f"{rate:,.0f} jobs/s without chaos, {args.workers} workers", flush=True)
    failed = 0
    for run in range(args.runs):
        for retries in args.retries:
            outcome = asyncio.run(soak(args, retries, args.seed + run))
            print(outcome.line(), flush=True)
            for line in outcome.other[:5]:
                print("   ", line)
            failed += not outcome.ok
    raise SystemExit(1 if failed else 0)


async def _rate(workers: int) -> float:
    """Jobs per second of the same job on the same pool, without chaos."""
    n = 20_000
    with tempfile.TemporaryDirectory() as tmp:
        ledger = str(Path(tmp) / "ledger")
        async with corral.Pool(workers) as pool:
            await pool.run(job, ledger, -1, 0)
            started = time.perf_counter()
            await asyncio.gather(*(pool.submit(job, ledger, i, 0).future for i in range(n)))
            return n / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
