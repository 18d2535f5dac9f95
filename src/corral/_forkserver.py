"""Keeps multiprocessing's forkserver alive when it cannot fork.

The forkserver forks every worker of the ``forkserver`` start method, and all of them die
with it: their parent-death signal fires, and the pool reads their end from the status
pipes it held. Its loop lets only ECONNABORTED pass, so a fork refused for a process limit
(EAGAIN under ``RLIMIT_NPROC`` or a cgroup's pids.max) ended it, and every healthy
worker's running job was lost as "exit code 255". Imported into the forkserver (the pool
asks it to preload this module), it wraps ``os.fork``: a fork that fails there closes the
fds the server received for that child, so the pool's read of the pid meets EOF and only
that start fails, and reaches the loop as ECONNABORTED, which it survives. Anywhere else,
and for every other caller, ``os.fork`` is what it was.

In the forkserver it also imports what multiprocessing's start-up of each worker would
import after the fork, so that no worker spends its first milliseconds on it. Preloaded
last, its import is the moment the server has preloaded everything: it says so on the FIFO
named by ``READY`` (see ``workers._process``), so the pool waits for that on its event loop
and not blocked in multiprocessing's read of the first worker's pid.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import multiprocessing.forkserver
import os
import sys
from types import FrameType

_SERVER_LOOP = multiprocessing.forkserver.main.__code__

# The environment variable naming the FIFO on which a booting forkserver says it is ready.
READY = "CORRAL_FORKSERVER_READY"
_fork = os.fork


def _fork_or_abort_the_request() -> int:
    """``os.fork``; in the forkserver's loop, a failure ends only the request at hand."""
    try:
        return _fork()
    except OSError as exc:
        server = sys._getframe(1)
        if server.f_code is not _SERVER_LOOP:
            raise
        # The server's loop holds the fds it received for the child: the two ends of its
        # status and data pipes, then the child's own. Closing them is what the loop does
        # after a fork; here it tells the pool, which waits on the status pipe, at once.
        received = server.f_locals
        for fd in (received["child_r"], received["child_w"], *received["fds"]):
            os.close(fd)
        raise OSError(errno.ECONNABORTED, f"the forkserver could not fork: {exc}") from exc


def _say_ready() -> None:
    """Tell the pool waiting on the FIFO that the server is ready to fork, if one waits."""
    path = os.environ.pop(READY, None)  # not for the workers it forks
    if path:
        with contextlib.suppress(OSError):  # ENXIO, ENOENT: the pool stopped waiting
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.write(fd, b"\n")
            finally:
                os.close(fd)


def _in_the_server() -> bool:
    """Whether this import runs in the forkserver's loop (its preloading)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _SERVER_LOOP:
            return True
        frame = frame.f_back
    return False


if _in_the_server():
    os.fork = _fork_or_abort_the_request
    # What multiprocessing's start-up in each worker imports after the fork (running the
    # main module again, unpickling the process object), imported once here instead.
    for _module in ("multiprocessing.popen_forkserver", "pkgutil"):
        importlib.import_module(_module)
    _say_ready()
