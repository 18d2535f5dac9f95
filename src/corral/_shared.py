"""A page of memory shared by the parent and one worker: the worker's acknowledgement.

Before a worker runs a call it stores the call's job id here. That store is the
acknowledgement: a plain memory write, no syscall, no message, no wake-up of the parent.
The parent reads the page only when it needs to know, chiefly once the worker has died:
the job named here was started (it is lost, or retried), every other job the worker held
was not (it goes back to the queue and runs exactly once elsewhere).

Job ids are never reused, so a stale id names a job that has already finished and matches
nothing the worker still holds.
"""

from __future__ import annotations

import mmap
import os

SIZE = mmap.PAGESIZE


class SharedPage:
    """The shared page, mapped from a memfd; the fd may be closed once both sides mapped it."""

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, SIZE)
        self.words = memoryview(self._map).cast("Q")  # words[0]: the job id started last

    @classmethod
    def create(cls) -> tuple[SharedPage, int]:
        """A new page and the fd to hand to the worker (the caller closes it)."""
        fd = os.memfd_create("corral-worker", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, SIZE)
            return cls(fd), fd
        except BaseException:
            os.close(fd)
            raise

    @property
    def started(self) -> int:
        """The id of the job the worker started last (0: none yet)."""
        return int(self.words[0])

    def close(self) -> None:
        """Unmap the page. Idempotent."""
        if not self._map.closed:
            self.words.release()
            self._map.close()
