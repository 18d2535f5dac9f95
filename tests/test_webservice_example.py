"""examples/webservice.py served as its users serve it: `python examples/webservice.py` in a
process of its own (a real uvicorn server, on the event loop under test, with 2 real worker
processes), spoken to over loopback with httpx, and stopped by a signal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests import processes
from tests.waits import BOUND, bounded, until

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "webservice.py"
RUNNING = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")

# fib(n) for the n the tests ask for.
FIB = {20: 6765, 22: 17711, 32: 2178309}


@dataclass
class Server:
    """A running example: its process, its address, and what it has logged so far."""

    process: asyncio.subprocess.Process
    url: str
    log: list[str]
    reader: asyncio.Task[None]

    def descendants(self) -> list[psutil.Process]:
        """Every process the server started and theirs: workers, forkserver, undertaker."""
        return psutil.Process(self.process.pid).children(recursive=True)

    async def stop(self, signum: int, *, group: bool) -> int:
        """Send signum to the server (to its whole process group, as a terminal's Ctrl-C
        does, when group is true) and return its exit status once it has ended and its log
        is read to the end."""
        if group:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)
        returncode = await bounded(self.process.wait())
        await bounded(self.reader)
        return returncode


@contextlib.asynccontextmanager
async def serve(loop_kind: str, backend: str = "corral") -> AsyncIterator[Server]:
    """Start the example with 2 workers on a free loopback port (port 0, read back from its
    log), on the loop under test; whatever is left of it when the block ends is killed."""
    # A runner without job control starts this process with SIGINT ignored, and the server
    # and every process it starts would inherit that (uvicorn installs its own handler, but
    # a worker still starting would ignore the Ctrl-C that a terminal's would get). A
    # handler, unlike SIG_IGN, is reset to the default across exec.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLE),
            "--port=0",
            "--workers=2",
            f"--loop={loop_kind}",
            f"--backend={backend}",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a test's Ctrl-C spares pytest
        )
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    log: list[str] = []
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def read_log() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            log.append(line)
            if not started.done() and (match := RUNNING.search(line)):
                started.set_result(match[1])
        if not started.done():
            started.set_exception(AssertionError("the server ended at start:\n" + "\n".join(log)))

    reader = asyncio.create_task(read_log())
    try:
        url = await bounded(started)
        yield Server(process, url, log, reader)
    finally:
        if process.returncode is None:
            # A test that failed before stopping it: kill it, and its workers with it (they
            # lead process groups of their own; corral's undertaker kills them when the
            # server dies).
            left = psutil.Process(process.pid).children(recursive=True)
            os.killpg(process.pid, signal.SIGKILL)
            await bounded(process.wait())
            await until(lambda: all(processes.dead(p.pid) for p in left))
        await bounded(reader)


def client(server: Server) -> httpx.AsyncClient:
    """An HTTP client of the server, waiting as long as any test may."""
    return httpx.AsyncClient(base_url=server.url, timeout=BOUND)


async def test_endpoints_answer(loop_kind: str) -> None:
    """Each endpoint answers as documented: /ping from the loop, /fib and /primes computed
    in the workers, a value out of bounds refused with 400 and a message naming the
    bound, and /stats showing the two worker processes."""
    async with serve(loop_kind) as server, client(server) as http:
        ping = await http.get("/ping")
        assert (ping.status_code, ping.text) == (200, "pong")

        fib = await http.get("/fib/20")
        assert fib.status_code == 200
        assert fib.json() == {"n": 20, "fib": FIB[20]}

        primes = await http.get("/primes/100")
        assert primes.status_code == 200
        assert primes.json() == {"below": 100, "primes": 25}

        too_big = await http.get("/fib/99")
        assert too_big.status_code == 400
        assert too_big.json() == {"error": "n must be at most 35, not 99"}

        stats = (await http.get("/stats")).json()
        pids = {worker["pid"] for worker in stats["workers"]}
        assert len(pids) == 2
        assert server.process.pid not in pids
        assert stats["calls"] == 2
        assert stats["failed"] == 0


async def test_loop_answers_while_every_worker_is_busy(loop_kind: str) -> None:
    """With both workers busy on long computations (seen in /stats: two calls in flight),
    /ping is still answered, by the server's loop, while both are running; then each
    computation returns its value."""
    async with serve(loop_kind) as server, client(server) as http:
        busy = [asyncio.create_task(http.get("/fib/32")) for _ in range(2)]

        async def in_flight() -> int:
            return int((await http.get("/stats")).json()["in_flight"])

        async def both_busy() -> None:
            while await in_flight() < 2:
                await asyncio.sleep(0.01)

        await bounded(both_busy())
        ping = await http.get("/ping")
        assert ping.text == "pong"
        assert not any(task.done() for task in busy), "the loop waited for the workers"
        assert await in_flight() == 2

        for response in await bounded(asyncio.gather(*busy)):
            assert response.json() == {"n": 32, "fib": FIB[32]}


async def test_a_crash_fails_its_request_alone(loop_kind: str) -> None:
    """A /crash whose task segfaults its worker, sent among concurrent CPU requests, gets a
    500 that says what happened; every request around it gets its right answer, and the
    pool serves on afterwards on a replacement worker (a new pid)."""
    async with serve(loop_kind) as server, client(server) as http:
        before = {w["pid"] for w in (await http.get("/stats")).json()["workers"]}
        paths = ["/fib/22"] * 3 + ["/crash"] + ["/fib/22"] * 3
        responses = await bounded(asyncio.gather(*(http.get(path) for path in paths)))

        crashed = responses[3]
        assert crashed.status_code == 500
        message = crashed.json()["error"]
        assert "this request's task crashed its worker process" in message
        assert "signal 11 (SIGSEGV)" in message
        for response in responses[:3] + responses[4:]:
            assert response.status_code == 200
            assert response.json() == {"n": 22, "fib": FIB[22]}

        after = await bounded(asyncio.gather(*(http.get("/fib/20") for _ in range(4))))
        assert [r.json()["fib"] for r in after] == [FIB[20]] * 4
        assert (await http.get("/ping")).text == "pong"
        pids = {w["pid"] for w in (await http.get("/stats")).json()["workers"]}
        assert len(pids) == 2
        assert len(pids - before) == 1  # the dead worker's replacement


async def test_on_the_executor_a_crash_breaks_every_request_after_it(loop_kind: str) -> None:
    """The same app on run_in_executor(ProcessPoolExecutor), the benchmark's comparison:
    it serves /fib, but after one /crash (503, BrokenProcessPool) every CPU request fails
    with 503 until the server restarts, while /ping, which needs no worker, still works."""
    async with serve(loop_kind, backend="executor") as server, client(server) as http:
        fib = await http.get("/fib/20")
        assert fib.json() == {"n": 20, "fib": FIB[20]}

        crashed = await http.get("/crash")
        assert crashed.status_code == 503
        assert "the process pool is broken" in crashed.json()["error"]

        after = await http.get("/fib/20")
        assert after.status_code == 503
        assert "until the server restarts" in after.json()["error"]
        assert (await http.get("/ping")).text == "pong"
        assert (await http.get("/stats")).status_code == 404


@pytest.mark.parametrize(
    ("signum", "group", "status"),
    [(signal.SIGINT, True, 0), (signal.SIGTERM, False, -signal.SIGTERM)],
    ids=["ctrl-c", "sigterm"],
)
async def test_stops_cleanly_on_a_signal(
    loop_kind: str, signum: int, group: bool, status: int
) -> None:
    """Ctrl-C at a terminal (SIGINT to the server's whole process group, workers' helpers
    included) or SIGTERM from a supervisor (to the server alone): the server shuts down
    (the lifespan closes the pool), exits without a traceback (0 after Ctrl-C; after
    SIGTERM uvicorn raises the signal again once it is done, so the status says how it
    ended), and no process it started outlives it."""
    async with serve(loop_kind) as server, client(server) as http:
        await bounded(asyncio.gather(*(http.get("/fib/20") for _ in range(2))))
        started = server.descendants()
        assert len(started) >= 3  # the two workers, and the helpers that start them

        assert await server.stop(signum, group=group) == status
        await until(lambda: all(processes.dead(p.pid) for p in started))

    log = "\n".join(server.log)
    assert "Application shutdown complete." in log
    assert "Traceback" not in log
    assert "ERROR" not in log
