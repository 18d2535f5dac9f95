"""A web service under load: examples/webservice.py on corral against the same app on
``loop.run_in_executor(ProcessPoolExecutor)``, driven over loopback by ``wrk``.

    python -m benchmarks.webservice [--rounds 2] [--seconds 10] [--connections 4] [--fib 24]

For each backend (2 workers each, ``--backend corral|executor`` of the one example app, on
uvicorn's default loop) a fresh server is started and measured in three steps:

- warm-up: ``wrk`` on ``/fib/N`` for 2 s, so every worker has started and run calls;
- load: ``wrk`` on ``/fib/N`` with ``--connections`` connections for ``--seconds`` s
  (requests/s, p50 and p99 latency of the CPU endpoint), and beside it a second ``wrk``
  on ``/ping`` with one connection, one request every 10 ms: the p50/p99 of an answer the
  loop gives by itself, while the workers are saturated (the loop's responsiveness);
- crash: the same load again, and halfway through one ``GET /crash`` (its task segfaults
  its worker). Counted: that request's status, the ``/fib`` requests of the run that got
  an error status (none can fail before the crash, so these are the ones after it), and
  whether ``/fib`` still answers once the run is over.

``--rounds`` rounds (2 by default) each measure both backends in turn, the order
alternating (corral, executor, executor, corral, ...): on a shared machine whichever ran
first was slower, whichever it was. Each timing is the best of its rounds, since noise only
ever slows a run down; the crash figures are listed round by round. wrk's latencies run
from sending a request to its answer (closed loop: a connection's next request waits for
the last answer). The report is a markdown table on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "webservice.py"
RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
BACKENDS = ("corral", "executor")
WORKERS = 2
WARM_UP = 2  # seconds of load before measuring: every worker started and warm
PING_EVERY_MS = 10  # the probe's pace on /ping: light, so it measures the loop, not loads it
START_TIMEOUT = 60  # seconds for a server to start, or to stop

# wrk's report as one JSON line (latencies in µs), after its own text.
WRK_SCRIPT = """
local pace = tonumber(os.getenv("WRK_PACE_MS") or "0")
if pace > 0 then
  function delay() return pace end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests": %d, "seconds": %f, "status_errors": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration / 1e6, e.status,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Wrk:
    """What one wrk run measured."""

    requests: int
    seconds: float
    status_errors: int  # answers with a status other than 2xx or 3xx
    socket_errors: int
    p50_us: int
    p99_us: int

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


@dataclass
class Result:
    """One backend's figures."""

    load: Wrk
    ping: Wrk
    crash_status: int
    crash_run: Wrk
    fib_after: int  # the status of GET /fib/N after the crash run


def start_wrk(
    url: str, seconds: int, connections: int, script: Path, pace_ms: int = 0
) -> subprocess.Popen[str]:
    env = {**os.environ, "WRK_PACE_MS": str(pace_ms)}
    return subprocess.Popen(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish_wrk(process: subprocess.Popen[str]) -> Wrk:
    out, err = process.communicate(timeout=START_TIMEOUT + 60)
    for line in out.splitlines():
        if line.startswith("JSON "):
            return Wrk(**json.loads(line[5:]))
    raise RuntimeError(f"wrk printed no report (exit {process.returncode}):\n{out}\n{err}")


def get(port: int, path: str) -> int:
    """GET path from the server on its own connection; its status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=START_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@contextlib.contextmanager
def server(backend: str, loop: str) -> Iterator[int]:
    """Serve the example on a free loopback port with WORKERS workers; yield the port, and
    stop the server with Ctrl-C's signal afterwards (killed if it does not stop)."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLE),
                "--port=0",
                f"--workers={WORKERS}",
                f"--backend={backend}",
                f"--loop={loop}",
                "--no-access-log",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        try:
            yield wait_for_port(process, log)
            process.send_signal(signal.SIGINT)
            process.wait(timeout=START_TIMEOUT)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_for_port(process: subprocess.Popen[bytes], log: IO[str]) -> int:
    """The port the server logs once it listens (polled: this is a benchmark's driver)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        log.seek(0)
        text = log.read()
        if match := RUNNING.search(text):
            return int(match[1])
        if process.poll() is not None:
            raise RuntimeError(f"the server exited at start:\n{text}")
        time.sleep(0.05)
    raise RuntimeError("the server did not start in time")


def measure(backend: str, args: argparse.Namespace, script: Path) -> Result:
    fib = f"/fib/{args.fib}"
    with server(backend, args.loop) as port:
        base = f"http://127.0.0.1:{port}"
        finish_wrk(start_wrk(base + fib, WARM_UP, args.connections, script))

        print(f"{backend}: load", file=sys.stderr, flush=True)
        load = start_wrk(base + fib, args.seconds, args.connections, script)
        ping = start_wrk(base + "/ping", args.seconds, 1, script, pace_ms=PING_EVERY_MS)
        load_result, ping_result = finish_wrk(load), finish_wrk(ping)

        print(f"{backend}: crash", file=sys.stderr, flush=True)
        crash_run = start_wrk(base + fib, args.seconds, args.connections, script)
        time.sleep(args.seconds / 2)  # the crash halfway through the load
        crash_status = get(port, "/crash")
        crash_result = finish_wrk(crash_run)
        fib_after = get(port, fib)
    return Result(load_result, ping_result, crash_status, crash_result, fib_after)


# The timed rows: (label, the figure of one round, whether higher is better). Each backend's
# figure is the best of its rounds: noise on a shared machine only ever slows a run down.
TIMED: list[tuple[str, Callable[[Result], float], bool]] = [
    ("{fib} requests/s ({connections} connections)", lambda r: r.load.per_second, True),
    ("{fib} latency p50 ms", lambda r: r.load.p50_us / 1000, False),
    ("{fib} latency p99 ms", lambda r: r.load.p99_us / 1000, False),
    ("/ping p50 ms during that load (one per {ping} ms)", lambda r: r.ping.p50_us / 1000, False),
    ("/ping p99 ms during that load (one per {ping} ms)", lambda r: r.ping.p99_us / 1000, False),
]

# The crash rows: (label, the figure of one round), listed round by round.
CRASH: list[tuple[str, Callable[[Result], object]]] = [
    ("/crash halfway through a second load: its status", lambda r: r.crash_status),
    (
        "{fib} requests of that load answered 2xx",
        lambda r: f"{r.crash_run.requests - r.crash_run.status_errors:,}",
    ),
    (
        "{fib} requests of that load failed (all after the crash)",
        lambda r: f"{r.crash_run.status_errors:,}",
    ),
    ("{fib} once that load is over: its status", lambda r: r.fib_after),
]


def report(results: dict[str, list[Result]], args: argparse.Namespace) -> str:
    """The table: best timings with their ratio, then the crash figures of every round."""
    names = {"fib": f"/fib/{args.fib}", "connections": args.connections, "ping": PING_EVERY_MS}
    lines = [
        "| measure | corral | executor | corral / executor |",
        "|---|---:|---:|---:|",
    ]
    for label, figure, higher_is_better in TIMED:
        pick = max if higher_is_better else min
        c, e = (pick(figure(r) for r in results[backend]) for backend in BACKENDS)
        digits = 0 if higher_is_better else 1
        ratio = f"{c / e:.2f}x" if e else "-"
        lines.append(f"| {label.format(**names)} | {c:,.{digits}f} | {e:,.{digits}f} | {ratio} |")
    for label, shown in CRASH:
        c_text, e_text = (" / ".join(str(shown(r)) for r in results[b]) for b in BACKENDS)
        lines.append(f"| {label.format(**names)} | {c_text} | {e_text} | |")
    sockets = {
        backend: sum(
            r.load.socket_errors + r.ping.socket_errors + r.crash_run.socket_errors for r in rounds
        )
        for backend, rounds in results.items()
    }
    if any(sockets.values()):
        lines.append("")
        lines.append(f"wrk's socket errors (connect, read, write, timeout): {sockets}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each load (s)")
    parser.add_argument("--connections", type=int, default=4, help="wrk's connections on /fib")
    parser.add_argument("--fib", type=int, default=24, help="the CPU endpoint's n: /fib/N")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of both backends, in alternating order"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        parser.error("needs wrk on PATH (Debian: apt-get install wrk)")

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "report.lua"
        script.write_text(WRK_SCRIPT)
        results: dict[str, list[Result]] = {backend: [] for backend in BACKENDS}
        for round_ in range(args.rounds):
            # corral, executor, executor, corral, ...: a slow spell falls on both alike
            order = BACKENDS if round_ % 2 == 0 else BACKENDS[::-1]
            for backend in order:
                results[backend].append(measure(backend, args, script))
    print(report(results, args))
    print()
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {WORKERS} workers each, "
        f"loop {args.loop}, {args.rounds} rounds, {args.seconds} s per load, /crash figures "
        f"listed per round; load average {load_before:.2f} "
        f"before, {os.getloadavg()[0]:.2f} after"
    )


if __name__ == "__main__":
    main()
