"""A pool belongs to the event loop it was first used on. Every public call made from
another loop, from a thread with no loop, or after the pool's loop closed is refused at the
call with a ``RuntimeError`` that says why, and runs nothing; ``close()`` never hangs."""

from __future__ import annotations

import asyncio
import functools
import inspect
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

import corral
from corral.workers import LocalWorker
from tests import tasks
from tests.processes import dead
from tests.waits import BOUND, bounded, wait_until

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}

# Each public entry of a pool, called as a user would (awaited when it is a coroutine).
# Each would write its own name into the marker file if it ran anything.
Entry = Callable[[corral.Pool, Path], Any]
ENTRIES: dict[str, Entry] = {
    "run": lambda pool, path: pool.run(tasks.append_line, str(path), "run"),
    "submit": lambda pool, path: pool.submit(tasks.append_line, str(path), "submit"),
    "map": lambda pool, path: pool.map(functools.partial(tasks.append_line, str(path)), ["map"]),
    "imap": lambda pool, path: pool.imap(functools.partial(tasks.append_line, str(path)), ["imap"]),
    "iterate": lambda pool, path: pool.iterate(tasks.count_up, None, str(path)),
    "broadcast": lambda pool, path: pool.broadcast(tasks.append_line, str(path), "broadcast"),
    "resize": lambda pool, path: pool.resize(2),
    "attach": lambda pool, path: pool.attach(LocalWorker()),
    "detach": lambda pool, path: pool.detach(pool.workers[0]),
    "close": lambda pool, path: pool.close(),
    "terminate": lambda pool, path: pool.terminate(),
}
SYNC_ENTRIES = ["submit", "imap", "iterate", "attach"]  # callable without a loop at all


async def call(entry: Entry, pool: corral.Pool, path: Path) -> None:
    """Make the call, and await it if it gave a coroutine (bounded: it must not hang)."""
    result = entry(pool, path)
    if inspect.iscoroutine(result):
        await bounded(result, 10)


async def still_serves(pool: corral.Pool, path: Path) -> None:
    """On its own loop the pool is as it was, one worker, serving; then it closes."""
    assert not pool.closed
    assert len(pool.stats().workers) == 1  # none started, none stopped
    assert await bounded(pool.run(tasks.add, 2, 3)) == 5
    await bounded(pool.close())
    assert not path.exists(), f"a refused call ran: {path.read_text()!r}"


def start(runner: asyncio.Runner, kind: str) -> corral.Pool:
    pool = corral.Pool(1, kind=kind)  # type: ignore[arg-type]
    runner.run(bounded(pool.start()))
    return pool


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("name", ENTRIES)
def test_a_call_from_another_loop_is_refused_and_runs_nothing(
    name: str, loop: str, tmp_path: Path
) -> None:
    """While the pool's loop lives, each public call made on another loop raises there, at
    the call, saying the pool belongs to another loop; no worker ran anything, none was
    started or stopped, and the pool serves on (and closes) on its own loop."""
    marker = tmp_path / "ran"
    with asyncio.Runner(loop_factory=LOOPS[loop]) as own:
        pool = start(own, "process")
        try:
            with (
                asyncio.Runner(loop_factory=LOOPS[loop]) as other,
                pytest.raises(RuntimeError, match="belongs to another event loop"),
            ):
                other.run(call(ENTRIES[name], pool, marker))
        finally:
            own.run(still_serves(pool, marker))


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("name", SYNC_ENTRIES)
def test_a_call_from_a_thread_with_no_loop_is_refused(name: str, loop: str, tmp_path: Path) -> None:
    """A call made from a thread with no running loop (here: a worker thread of the
    pool's loop, while that loop runs) is refused at the call and says how to reach the
    pool's loop; nothing runs."""
    marker = tmp_path / "ran"

    async def main() -> None:
        async with corral.Pool(1, kind="thread") as pool:
            with pytest.raises(RuntimeError, match="no event loop is running") as info:
                await bounded(asyncio.to_thread(ENTRIES[name], pool, marker))
            assert "run_coroutine_threadsafe" in str(info.value)
            await still_serves(pool, marker)

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_iterating_on_another_loop_is_refused_and_the_iteration_goes_on(loop: str) -> None:
    """An ``imap`` or ``iterate`` made on the pool's loop and then iterated on another
    raises there at once (its values could never arrive there), and carries on where it
    was when iterated on its own loop again."""

    async def begin(pool: corral.Pool) -> tuple[Any, Any]:
        mapped = pool.imap(tasks.square, range(10), chunksize=1)
        stream = pool.iterate(tasks.count_up, 10, window=2)
        assert await bounded(anext(mapped)) == 0
        assert await bounded(anext(stream)) == 0
        return mapped, stream

    async def elsewhere(iterator: Any) -> None:
        await bounded(anext(iterator), 10)

    async def finish(pool: corral.Pool, mapped: Any, stream: Any) -> None:
        assert [x async for x in mapped] == [x * x for x in range(1, 10)]
        assert [x async for x in stream] == list(range(1, 10))
        await bounded(pool.close())

    with asyncio.Runner(loop_factory=LOOPS[loop]) as own:
        pool = start(own, "thread")
        try:
            mapped, stream = own.run(begin(pool))
            with asyncio.Runner(loop_factory=LOOPS[loop]) as other:
                for iterator in (mapped, stream):
                    with pytest.raises(RuntimeError, match="belongs to another event loop"):
                        other.run(elsewhere(iterator))
        finally:
            own.run(finish(pool, mapped, stream))


CLOSED_LOOP_SCRIPT = """
import asyncio
import sys
from pathlib import Path

import corral
from tests.test_loops import ENTRIES, LOOPS, call

kind, loop, marker = sys.argv[1], LOOPS[sys.argv[2]], Path(sys.argv[3])
with asyncio.Runner(loop_factory=loop) as own:
    pool = corral.Pool(1, kind=kind)
    own.run(pool.start())
    print(getattr(pool.workers[0], "pid", None), flush=True)  # None: no process
with asyncio.Runner(loop_factory=loop) as other:
    for name, entry in ENTRIES.items():
        try:
            other.run(call(entry, pool, marker))
        except RuntimeError as exc:
            assert "event loop is closed" in str(exc), exc
        else:
            raise AssertionError(f"{name} was not refused")
print("refused", flush=True)
"""


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", ["process", "thread", "local"])
def test_every_call_after_the_pools_loop_closed_is_refused(
    kind: str, loop: str, tmp_path: Path
) -> None:
    """Once the loop a pool was used on has closed, every public call, ``close()`` too, is
    refused at once on a new loop (nothing hangs, nothing runs) with an error that says
    the pool's loop is closed. In a program of its own: a pool that can no longer be
    closed keeps its pipes and threads until the program ends; its worker process goes
    with the program."""
    marker = tmp_path / "ran"
    done = subprocess.run(
        [sys.executable, "-c", CLOSED_LOOP_SCRIPT, kind, loop, str(marker)],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=BOUND,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    pid, refused = done.stdout.split()
    assert refused == "refused"
    assert not marker.exists(), f"a refused call ran: {marker.read_text()!r}"
    if kind == "process":
        wait_until(lambda: dead(int(pid)))


def test_a_pool_is_refused_outside_a_loop_before_it_has_one() -> None:
    """A pool never used is not bound to a loop, but a call with no loop running is still
    refused at the call with a clear error (not asyncio's bare 'no running event loop')."""
    pool = corral.Pool(1, kind="local")
    for name in SYNC_ENTRIES:
        with pytest.raises(RuntimeError, match="no event loop is running"):
            ENTRIES[name](pool, Path("/nonexistent"))

    async def use() -> None:
        async with pool:
            assert await bounded(pool.run(tasks.add, 1, 1)) == 2

    with asyncio.Runner() as runner:
        runner.run(use())


@pytest.mark.parametrize("loop", LOOPS)
def test_run_from_another_thread_through_run_coroutine_threadsafe(loop: str) -> None:
    """The guide's way from another thread: ``pool.run(f, x)`` made where no loop runs is
    a coroutine that queues the call once it runs on the pool's loop
    (``asyncio.run_coroutine_threadsafe``), and gives its value."""

    async def main() -> None:
        async with corral.Pool(1, kind="thread") as pool:
            own = asyncio.get_running_loop()

            def from_thread() -> int:
                call = pool.run(tasks.add, 2, 3)
                result: int = asyncio.run_coroutine_threadsafe(call, own).result(BOUND)
                return result

            assert await bounded(asyncio.to_thread(from_thread)) == 5

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())
