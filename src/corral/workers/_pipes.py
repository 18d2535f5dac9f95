"""The parent's ends of a worker's pipes, driven by the event loop (no threads, no polling).

Each ``LoopReader`` / ``LoopWriter`` owns one fd and is its only closer: ``close()`` takes the
fd off the loop first and closes it second, once. Celery's prefork pool crashed for years
because a late clean-up closed an fd number that the OS had meanwhile handed to a new
worker; here nothing outside these objects closes a worker fd, and every table that
remembers a pipe holds the object, never the number.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

    from .._wire import Buffer, Frame, FrameDecoder

# Linux lets an unprivileged process grow a pipe to /proc/sys/fs/pipe-max-size (1 MiB by
# default). Larger pipes mean fewer wake-ups per large payload; the memory is only used
# while data is in flight.
PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

# writev takes at most IOV_MAX buffers per call.
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)

# Every parent-side pipe end still open. A forked child inherits all of them and must close
# them, or it would hold a sibling's pipe open and hide that sibling's EOF.
_open_ends: weakref.WeakSet[LoopReader | LoopWriter] = weakref.WeakSet()


def open_fds() -> list[int]:
    """The fds of every parent-side pipe end open now (what a forked child must close)."""
    return [end.fd for end in list(_open_ends) if end.fd >= 0]


def enlarge(fd: int) -> None:
    """Grow a pipe's buffer where the OS allows; a smaller pipe still works."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)


class LoopReader:
    """Reads frames from a non-blocking fd whenever the loop says it is readable.

    ``on_frames`` gets each batch of complete frames; ``on_eof`` is called once when the
    other end is closed (or the fd fails); after either may close the reader.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        decoder: FrameDecoder,
        on_frames: Callable[[list[Frame]], None],
        on_eof: Callable[[], None],
    ) -> None:
        self.fd = fd
        self.at_eof = False
        self._loop = loop
        self._decoder = decoder
        self._on_frames = on_frames
        self._on_eof = on_eof
        os.set_blocking(fd, False)
        _open_ends.add(self)
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        decoder = self._decoder
        while self.fd >= 0 and not self.at_eof:
            target = decoder.get_buffer()
            try:
                n = os.readv(self.fd, [target])
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if n == 0:
                self.at_eof = True
                self.pause()
                self._on_eof()
                return
            frames = decoder.buffer_updated(n)
            if frames:
                self._on_frames(frames)
                del frames  # drop the bodies, so the decoder may reuse a big buffer
            if n < len(target):
                return  # drained; a full read means more may be waiting

    def drain(self) -> None:
        """Read whatever is buffered now (used once the writer is known to be dead)."""
        if self.fd >= 0:
            self._readable()

    def pause(self) -> None:
        """Stop watching the fd without closing it."""
        if self.fd >= 0:
            self._loop.remove_reader(self.fd)

    def close(self) -> None:
        """Take the fd off the loop, then close it. Idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            self._loop.remove_reader(fd)
            os.close(fd)
            _open_ends.discard(self)


class LoopWriter:
    """Writes buffers to a non-blocking fd, resuming when the pipe has room again.

    A write to an idle pipe goes out at once (the lowest latency); while the writer is
    corked, or waiting for room, writes queue up and leave together in one ``writev``. A
    write that does not fit leaves the rest queued (bytes go out in order, so frame
    boundaries survive), and the loop calls back when the pipe drains. ``written`` counts
    the bytes that have left, so the owner can tell which frames went out whole.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        on_error: Callable[[OSError], None],
    ) -> None:
        self.fd = fd
        self.written = 0
        self.queued = 0
        self._loop = loop
        self._on_error = on_error
        self._buffers: deque[memoryview] = deque()
        self._corked = False
        self._waiting = False  # registered with add_writer
        self._close_when_flushed = False
        os.set_blocking(fd, False)
        _open_ends.add(self)

    def write(self, buffers: list[Buffer]) -> None:
        """Write buffers in order: now if the pipe is idle, else with what is queued."""
        if self.fd < 0:
            return
        for buffer in buffers:
            view = memoryview(buffer)
            self._buffers.append(view)
            self.queued += view.nbytes
        if not (self._corked or self._waiting):
            self._flush()

    def cork(self) -> None:
        """Hold writes back until ``uncork``, to send a burst in one ``writev``."""
        self._corked = True

    def uncork(self) -> None:
        """Write what was held back."""
        self._corked = False
        if self._buffers and not self._waiting:
            self._flush()

    @property
    def unwritten(self) -> int:
        """Bytes queued but not yet written."""
        return self.queued - self.written

    def close_when_flushed(self) -> None:
        """Close once everything queued is written (the reader then sees EOF)."""
        self._close_when_flushed = True
        if not self._buffers:
            self.close()

    def _flush(self) -> None:
        buffers = self._buffers
        while buffers and self.fd >= 0:
            batch = list(buffers) if len(buffers) <= _IOV_MAX else list(buffers)[:_IOV_MAX]
            try:
                n = os.writev(self.fd, batch)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                self._fail(exc)
                return
            self.written += n
            if self.written == self.queued:  # the usual case: everything went out
                buffers.clear()
                break
            while n:
                head = buffers[0]
                if n >= head.nbytes:
                    n -= head.nbytes
                    buffers.popleft()
                else:
                    buffers[0] = head[n:]
                    n = 0
        if self.fd < 0:
            return
        if buffers and not self._waiting:
            self._waiting = True
            self._loop.add_writer(self.fd, self._flush)
        elif not buffers:
            if self._waiting:
                self._waiting = False
                self._loop.remove_writer(self.fd)
            if self._close_when_flushed:
                self.close()

    def _fail(self, exc: OSError) -> None:
        self.close()
        self._on_error(exc)

    def close(self) -> None:
        """Take the fd off the loop, then close it; queued buffers are dropped. Idempotent."""
        fd, self.fd = self.fd, -1
        self._buffers.clear()
        if fd >= 0:
            if self._waiting:
                self._waiting = False
                self._loop.remove_writer(fd)
            os.close(fd)
            _open_ends.discard(self)
