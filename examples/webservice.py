"""A web service that hands its CPU-bound work to corral and keeps answering.

    pip install 'corral[web]'
    python examples/webservice.py --port 8000
    curl localhost:8000/fib/27       # computed in a worker process
    curl localhost:8000/primes/1000  # so is this
    curl localhost:8000/ping         # answered by the event loop itself, even while both
                                     # workers are busy
    curl localhost:8000/crash        # its task segfaults its worker: this request gets a 500,
                                     # the pool replaces the worker, every other one goes on
    curl localhost:8000/stats        # pool.stats(): the workers, their load, recent timings

One pool for the application's life, opened in its lifespan: the worker processes start
once, before the first request is accepted, and are closed after the last one is answered
(uvicorn stops accepting, finishes the requests in flight, then runs the lifespan's exit).
A handler awaits ``pool.run(fn, *args)``; nothing in the server process blocks, so the loop
keeps answering what needs no worker.

``--backend executor`` serves the same app on ``loop.run_in_executor(ProcessPoolExecutor)``,
for comparison (benchmarks/webservice.py). There one task that kills its process breaks the
executor: the request that caused it, every request in flight with it and every request
after it fail with ``BrokenProcessPool`` until the server is restarted.

The task functions are plain module-level functions of this script, as users write them;
the workers import the script (as ``__mp_main__``) to find them, which is why it starts the
server under ``if __name__ == "__main__":``. (The ``--8<--`` comments mark the excerpts
that docs/webservice.md shows.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypedDict

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import corral

# The largest n each endpoint takes: fib(35) takes seconds in CPython and every step up
# costs 1.6 times more, so a larger n would hold a worker for minutes.
MAX_FIB = 35
MAX_PRIMES = 50_000_000

# `run(fn, *args)`: await fn(*args) computed in a worker process.
Run = Callable[..., Awaitable[Any]]


class State(TypedDict):
    """What every request finds in `request.state`: the backend's way to run a call, and
    the pool (None on the executor, which keeps no stats)."""

    run: Run
    pool: corral.Pool | None


# -- the tasks: plain functions, run in the worker processes ---------------------------------


def fib(n: int) -> int:
    """The n-th Fibonacci number, computed the slow way on purpose: pure CPU in Python."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def count_primes(below: int) -> int:
    """How many primes there are below `below` (the sieve of Eratosthenes)."""
    if below < 3:
        return 0
    sieve = bytearray([1]) * below
    sieve[0] = sieve[1] = 0
    for i in range(2, int(below**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, below, i)))
    return sieve.count(1)


def crash() -> None:
    """Kill this process as a crash in native code does (a bad pointer in a C extension)."""
    os.kill(os.getpid(), signal.SIGSEGV)


# -- the backends: one pool for the app's life -----------------------------------------------


# --8<-- [start:pool]
@contextlib.asynccontextmanager
async def corral_backend(workers: int | None) -> AsyncIterator[State]:
    """A corral pool: a worker that dies costs its own call, and is replaced."""
    async with corral.Pool(workers) as pool:
        yield {"run": pool.run, "pool": pool}


# --8<-- [end:pool]


@contextlib.asynccontextmanager
async def executor_backend(workers: int | None) -> AsyncIterator[State]:
    """The standard library's process pool, as asyncio offers it: `run_in_executor`."""
    loop = asyncio.get_running_loop()
    # forkserver, as corral uses, and the default from Python 3.14 on: a worker forked from
    # the server would inherit its loop, its listening socket and its open connections.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=context) as executor:
        yield {"run": functools.partial(loop.run_in_executor, executor), "pool": None}


BACKENDS = {"corral": corral_backend, "executor": executor_backend}


# -- the endpoints ---------------------------------------------------------------------------


async def ping(request: Request) -> Response:
    """Answered by the event loop itself: how long it takes shows how free the loop is."""
    return PlainTextResponse("pong")


# --8<-- [start:endpoint]
async def fib_endpoint(request: Request) -> Response:
    n = request.path_params["n"]
    if n > MAX_FIB:
        return JSONResponse({"error": f"n must be at most {MAX_FIB}, not {n}"}, status_code=400)
    return JSONResponse({"n": n, "fib": await request.state.run(fib, n)})


# --8<-- [end:endpoint]


async def primes_endpoint(request: Request) -> Response:
    below = request.path_params["below"]
    if below > MAX_PRIMES:
        message = f"below must be at most {MAX_PRIMES}, not {below}"
        return JSONResponse({"error": message}, status_code=400)
    return JSONResponse({"below": below, "primes": await request.state.run(count_primes, below)})


async def crash_endpoint(request: Request) -> Response:
    await request.state.run(crash)
    return PlainTextResponse("crash() returned: its worker survived SIGSEGV", status_code=500)


async def stats_endpoint(request: Request) -> Response:
    """The pool's numbers, answered by the loop: which workers run what, and for how long."""
    pool = request.state.pool
    if pool is None:
        return JSONResponse({"error": "this backend keeps no stats"}, status_code=404)
    return JSONResponse(dataclasses.asdict(pool.stats()))


# --8<-- [start:crash]
async def worker_lost(request: Request, exc: Exception) -> Response:
    """corral: this request's task killed its worker; the pool has replaced it."""
    message = f"this request's task crashed its worker process ({exc}); the pool serves on"
    return JSONResponse({"error": message}, status_code=500)


# --8<-- [end:crash]


async def pool_broken(request: Request, exc: Exception) -> Response:
    """The executor: a worker died, and the whole executor with it."""
    message = (
        f"the process pool is broken ({exc}); every request that needs it fails until the "
        "server restarts"
    )
    return JSONResponse({"error": message}, status_code=503)


def make_app(backend: str = "corral", workers: int | None = None) -> Starlette:
    """The app on the given backend ("corral" or "executor") with `workers` processes (None:
    one per CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    open_backend = BACKENDS[backend]

    # --8<-- [start:lifespan]
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        # Entered before the first request is accepted, left after the last is answered.
        # What it yields, each request finds in `request.state`.
        async with open_backend(workers) as state:
            yield state

    # --8<-- [end:lifespan]

    routes = [
        Route("/ping", ping),
        Route("/fib/{n:int}", fib_endpoint),
        Route("/primes/{below:int}", primes_endpoint),
        Route("/crash", crash_endpoint),
        Route("/stats", stats_endpoint),
    ]
    handlers = {corral.WorkerLostError: worker_lost, BrokenProcessPool: pool_broken}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


def count(text: str) -> int:
    """argparse's type for a number of workers: a whole number, 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=8000, help="port to listen on; 0: any free one (logged)"
    )
    parser.add_argument(
        "--workers", type=count, default=None, help="worker processes (default: one per CPU)"
    )
    parser.add_argument("--backend", choices=list(BACKENDS), default="corral")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    parser.add_argument("--no-access-log", action="store_true", help="log no line per request")
    args = parser.parse_args(argv)
    # corral's records (a worker lost, killed at a time limit, recycled) beside uvicorn's:
    # uvicorn configures only its own loggers.
    logging.basicConfig(format="%(levelname)s:  %(name)s: %(message)s", level=logging.INFO)
    # Ctrl-C or SIGTERM: uvicorn stops accepting, answers the requests in flight, then
    # leaves the lifespan, which closes the pool.
    uvicorn.run(
        make_app(args.backend, args.workers),
        host=args.host,
        port=args.port,
        loop=args.loop,
        lifespan="on",  # the app needs its lifespan: without the pool it cannot serve
        access_log=not args.no_access_log,
    )


if __name__ == "__main__":
    main()
