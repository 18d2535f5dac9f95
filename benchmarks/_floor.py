"""The raw pipe floor: a round trip between two Python processes, a pickle each way.

No pool can answer faster than this: the parent pickles a call, writes it length-prefixed
into a pipe, a child blocked on that pipe reads it, unpickles it, runs it, pickles the
result and writes it back into a second pipe, on which the parent was blocked. The
latency measurement times this beside the library's own calls, interleaved in the same
process, so a target such as "the median round trip at most 1.3x the floor" compares
numbers taken under the same load. ``call_on_loop`` is the same round trip awaited on the
event loop: the floor of a pool whose parent is an asyncio program.

The child is forked before any pool exists (a fork of a process with threads is unsafe)
and runs nothing but its loop; ``close`` kills and reaps it.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import struct
from collections.abc import Callable
from typing import Any

_HEADER = struct.Struct("!I")


def _read_exactly(fd: int, n: int) -> bytes:
    data = os.read(fd, n)
    while len(data) < n:
        more = os.read(fd, n - len(data))
        if not more:
            raise EOFError("the other end of the floor's pipe closed")
        data += more
    return data


def _read_frame(fd: int) -> Any:
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    return pickle.loads(_read_exactly(fd, size))


def _write_frame(fd: int, obj: Any) -> None:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    os.write(fd, _HEADER.pack(len(body)) + body)


class PipeFloor:
    """A forked child that answers ``(fn, args)`` frames with ``fn(*args)``."""

    def __init__(self) -> None:
        calls_r, self._calls = os.pipe()
        self._results, results_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: serve until the parent goes, then leave at once
            try:
                os.close(self._calls)
                os.close(self._results)
                while True:
                    fn, args = _read_frame(calls_r)
                    _write_frame(results_w, fn(*args))
            finally:
                os._exit(0)
        os.close(calls_r)
        os.close(results_w)
        self.pid = pid
        self._loop: asyncio.AbstractEventLoop | None = None
        self._answer: asyncio.Future[None] | None = None

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One round trip: ``fn(*args)`` run in the child (fn goes by reference)."""
        _write_frame(self._calls, (fn, args))
        return _read_frame(self._results)

    async def call_on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """The same round trip, the parent waiting for the answer on its event loop (woken
        by the selector, its reader registered once, as a pool's parent is) instead of
        blocked in ``read``: the floor of any asyncio pool; its difference from ``call``
        is the loop's own cost."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            loop.add_reader(self._results, self._readable)
        self._answer = loop.create_future()
        _write_frame(self._calls, (fn, args))
        await self._answer
        return _read_frame(self._results)

    def _readable(self) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(None)

    def close(self) -> None:
        """Kill and reap the child, close the pipes. Idempotent."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._results)
        self._loop = None
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0
            os.close(self._calls)
            os.close(self._results)
