"""Memory shared by the parent and one worker: the acknowledgement page, payload regions.

Before a worker runs a call it stores the call's job id here. That store is the
acknowledgement: a plain memory write, no syscall, no message, no wake-up of the parent.
The parent reads the page only when it needs to know, chiefly once the worker has died:
the job named here was started (it is lost, or retried), every other job the worker held
was not (it goes back to the queue and runs exactly once elsewhere).

Job ids are never reused, so a stale id names a job that has already finished and matches
nothing the worker still holds.

In a worker, tasks run between any two uses of an fd, and a task may close fds it does not
own (a daemonising helper closes them all) and open a file that takes one of the numbers.
So the worker's side never acts on an fd number it cannot vouch for: it checks that its
own fd still names its memfd before it maps or grows one, and keeps no mmap object that
would itself resize or close a copy of the fd later (see ``_map_in_worker``). A worker
that finds an fd taken over exits at once (``abandon``), closing nothing: that costs the
worker, and its unstarted jobs go elsewhere, rather than a payload read from, or written
into, someone else's file.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import weakref
from collections.abc import Callable
from typing import NoReturn, TypeVar

from ._errors import FDS_LOST

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


def abandon() -> NoReturn:
    """Exit this worker at once, closing nothing: one of its fds may now be someone else's."""
    os._exit(FDS_LOST)


class SharedPage:
    """The shared page, mapped from a memfd; the fd may be closed once both sides mapped it.

    ``worker``: mapped on the worker's side (see ``_map_in_worker``)."""

    def __init__(self, fd: int, *, worker: bool = False) -> None:
        self._map = _map_in_worker(fd, SIZE) if worker else mmap.mmap(fd, SIZE)
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
    sender and one copy out by the receiver. The region grows, in powers of two, to hold
    the largest payload seen, and is reused: the sender writes only once the receiver has
    counted the previous payload as taken (a word of the shared page), and falls back to
    the pipe otherwise. It is an anonymous memfd, so it vanishes with the last process
    that maps it.

    ``worker``: the worker's side, which checks its fd before each use and maps it so that
    no map acts on the fd again (see the module's docstring).
    """

    def __init__(self, fd: int, *, worker: bool = False) -> None:
        self._fd = fd
        self._identity = _identity(fd) if worker else None
        self._map = self._mapping(os.fstat(fd).st_size)
        self.sent = 0  # payloads written (the sender's count; the receiver's is in the page)
        _mapped.add(self)

    def _mapping(self, size: int) -> mmap.mmap:
        """A map of the first size bytes of the memfd."""
        if self._identity is None:
            return mmap.mmap(self._fd, size)
        self._vouch()
        return _map_in_worker(self._fd, size)

    def _vouch(self) -> None:
        """In a worker: exit unless the fd still names this region's memfd."""
        try:
            mine = _identity(self._fd) == self._identity
        except OSError:  # closed
            mine = False
        if not mine:
            abandon()

    def _grow(self, size: int) -> None:
        """Grow the memfd to size bytes, and the map with it."""
        if self._identity is None:
            self._map.resize(size)  # through the map's own copy of the fd
            return
        self._vouch()
        os.ftruncate(self._fd, size)
        self._map = self._mapping(size)

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
                self._grow(max(SIZE, 1 << (total - 1).bit_length()))
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
            if self._identity is not None:
                self._vouch()  # before its size is read: it must be this region's
            self._map = self._mapping(os.fstat(self._fd).st_size)
        return memoryview(self._map)[:size]

    def close(self) -> None:
        """Unmap and close. Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(BufferError):  # a view is held: it goes when that does
                self._map.close()
            os.close(fd)


def _identity(fd: int) -> tuple[int, int]:
    """What an fd names (device, inode), to tell whether its number was taken over."""
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


def _map_in_worker(fd: int, size: int) -> mmap.mmap:
    """Map fd so that the map never acts on fd's number again.

    An mmap object keeps a copy of the fd: ``resize()`` truncates through it and closing
    the map closes it, by number, maybe long after a task closed it and a file of the
    task's took the number. Python 3.13's ``trackfd=False`` keeps no copy. Before 3.13 the
    map is kept for the life of the process instead (an extra reference that is never
    given back), so its copy is never closed; a region that grows leaves its older, smaller
    maps behind: address space and one fd each, a few at most as it grows in powers of
    two, while the memory is the memfd's, shared by all its maps.
    """
    if sys.version_info >= (3, 13):
        return mmap.mmap(fd, size, trackfd=False)
    mapped = mmap.mmap(fd, size)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(mapped))
    return mapped


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
