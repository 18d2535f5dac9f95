"""Memory shared by the parent and one worker: the acknowledgement page, payload regions.

Before a worker runs a call it stores the call's job id here. That store is the
acknowledgement: a plain memory write, no syscall, no message, no wake-up of the parent.
The parent reads the page only when it needs to know, chiefly once the worker has died:
the job named here was started (it is lost, or retried), every other job the worker held
was not (it goes back to the queue and runs exactly once elsewhere).

Job ids are never reused, so a stale id names a job that has already finished and matches
nothing the worker still holds.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import weakref
from collections.abc import Callable
from typing import TypeVar

SIZE = mmap.PAGESIZE
T = TypeVar("T")

# Every page and region mapped in this process. A child made by fork inherits all of them,
# its siblings' included: it would hold their memory alive (a dead worker's region, grown
# to the largest payload it ever carried, would outlive it) and could read and write their
# acknowledgements and payloads. ``release_inherited`` lets go of them.
_mapped: weakref.WeakSet[SharedPage | SharedRegion] = weakref.WeakSet()


def release_inherited() -> None:
    """Unmap and close every page and region this process inherited (in a forked worker,
    before it maps its own; elsewhere there are none)."""
    for shared in list(_mapped):
        shared.close()


class SharedPage:
    """The shared page, mapped from a memfd; the fd may be closed once both sides mapped it."""

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, SIZE)
        self.words = memoryview(self._map).cast("Q")  # words[0]: the job id started last
        self._seen = 0  # the cancellation count last read (worker's side)
        self._cancelled: set[int] = set()
        _mapped.add(self)

    @classmethod
    def create(cls) -> tuple[SharedPage, int]:
        """A new page and the fd to hand to the worker (the caller closes it)."""
        fd = _memfd("corral-worker")
        return _owning(cls, fd), fd

    def cancel(self, job: int) -> None:
        """Name job as cancelled (the parent's side): it will not start, and if it is
        running, the worker's interrupt handler will find it here."""
        count = self.words[CANCELS]
        self.words[RING + count % RING_SIZE] = job
        self.words[CANCELS] = count + 1

    def cancelled(self, job: int) -> bool:
        """Whether job was named as cancelled (the worker's side). The ring is read again
        only when the parent has written to it since: one word read per call otherwise."""
        count = self.words[CANCELS]
        if count != self._seen:
            self._seen = count  # the parent writes the id before the count
            self._cancelled = set(self.words[RING:])
        return job in self._cancelled

    @property
    def started(self) -> int:
        """The id of the job the worker started last (0: none yet)."""
        return int(self.words[STARTED])

    @property
    def taken(self) -> int:
        """The id of the job the worker took up last: it is unpickling it, or has started it."""
        return int(self.words[TAKEN])

    def close(self) -> None:
        """Unmap the page. Idempotent."""
        if not self._map.closed:
            self.words.release()
            self._map.close()


# Words of the page, each written by one side only.
STARTED = 0  # the job id the worker started last (written by the worker)
ARGS_TAKEN = 1  # large payloads the worker has copied out of the parent's region
RESULTS_TAKEN = 2  # large payloads the parent has copied out of the worker's region
CANCELS = 3  # how many job ids the parent has written to the ring (written by the parent)
TAKEN = 4  # the job id the worker took up last, before unpickling it (written by the worker)
# The ring: the ids of the last RING_SIZE jobs cancelled. A worker holds at most `prefetch`
# jobs, far fewer, so an id still pending is never overwritten before the worker sees it.
RING = 256
RING_SIZE = SIZE // 8 - RING


class SharedRegion:
    """Memory shared with one worker for large payloads going one way.

    A large ``bytes`` argument or result would otherwise cross the pipe a pipe-full at a
    time, the two processes taking turns. Through the region it is one copy in by the
    sender and one copy out by the receiver. The region grows to the largest payload seen
    and is reused: the sender writes only once the receiver has counted the previous
    payload as taken (a word of the shared page), and falls back to the pipe otherwise.
    It is an anonymous memfd, so it vanishes with the last process that maps it.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        self.sent = 0  # payloads written (the sender's count; the receiver's is in the page)
        _mapped.add(self)

    @classmethod
    def create(cls) -> tuple[SharedRegion, int]:
        """A new region; the returned fd is the region's own (do not close it)."""
        fd = _memfd("corral-payload")
        return _owning(cls, fd), fd

    def write(self, buffers: list[memoryview]) -> bool:
        """Copy buffers in, one after another, growing the region as needed.

        False when it could not (a view of it is still held somewhere): send by pipe then.
        """
        total = sum(b.nbytes for b in buffers)
        try:
            if len(self._map) < total:
                self._map.resize(-(-total // SIZE) * SIZE)  # whole pages; grows the memfd
            view = memoryview(self._map)
        except (BufferError, OSError):
            return False
        offset = 0
        for buffer in buffers:
            view[offset : offset + buffer.nbytes] = buffer
            offset += buffer.nbytes
        view.release()
        return True

    def view(self, size: int) -> memoryview:
        """The first size bytes, mapping the region afresh if the sender has grown it."""
        if len(self._map) < size:
            self._map = mmap.mmap(self._fd, os.fstat(self._fd).st_size)
        return memoryview(self._map)[:size]

    def close(self) -> None:
        """Unmap and close. Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(BufferError):  # a view is held: it goes when that does
                self._map.close()
            os.close(fd)


def _owning(cls: Callable[[int], T], fd: int) -> T:
    """cls(fd), closing fd if that fails (mapping dups the fd: it may find none left)."""
    try:
        return cls(fd)
    except BaseException:
        os.close(fd)
        raise


def _memfd(name: str) -> int:
    """An anonymous memory file of one page (it vanishes with its last fd and mapping)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, SIZE)
    except BaseException:
        os.close(fd)
        raise
    return fd
