"""The undertaker: when the program dies, what its workers' tasks started dies too.

A worker dies with the program's process by itself (``PR_SET_PDEATHSIG``, see ``_child``),
even mid-task; but a process its task started (a ``subprocess.Popen``, a pool of its own)
would be adopted by init and live on. So each worker leads a process group of its own,
which what its task starts joins, and one small process per program, the undertaker,
holds a pipe from the program and the list of those groups:

    program                                   undertaker
      worker started  -- "+pgid" ---------->  remembers the group
      worker reaped   -- "-pgid" ---------->  forgets it
      dies, however   -- EOF -------------->  SIGKILLs every group it remembers, exits

The kernel closes the pipe when the program dies, even by SIGKILL, so nothing has to run
in the dying program. The undertaker is a fresh interpreter that imports nothing of
corral (started once, as the first worker starts; a few milliseconds) in a session of its
own, so a Ctrl-C meant for the program does not reach it. A process that leaves its
worker's group (``setsid``, a daemon) is out of reach, as it means to be.
"""

from __future__ import annotations

import os
import sys
import threading

# What the undertaker runs; the marker in its command line names it in process listings.
_PROGRAM = """\
import os, signal  # corral-undertaker
signal.signal(signal.SIGINT, signal.SIG_IGN)
groups, pending = set(), b""
while True:
    try:
        data = os.read(0, 65536)
    except InterruptedError:
        continue
    if not data:
        break
    *lines, pending = (pending + data).split(b"\\n")
    for line in lines:
        (groups.add if line[:1] == b"+" else groups.discard)(int(line[1:]))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""

MARKER = "corral-undertaker"

_lock = threading.Lock()
_fd = -1  # the program's end of the pipe (-1: no undertaker yet, or it is gone)


def prepare() -> None:
    """Start the undertaker now unless it runs, before the first worker exists: the
    process worker calls it while the forkserver boots, which the parent waits for anyway,
    instead of between two workers' starts. ``watch`` starts it otherwise."""
    with _lock:
        if _fd < 0:
            _start()  # one that could not start is tried again by watch()


def watch(pgid: int) -> None:
    """Have the undertaker SIGKILL process group pgid if this program dies first."""
    _tell(f"+{pgid}\n".encode(), start=True)


def forget(pgid: int) -> None:
    """The group's leader was reaped: nothing of it is the undertaker's business now."""
    _tell(f"-{pgid}\n".encode(), start=False)


def _tell(line: bytes, *, start: bool) -> None:
    global _fd
    with _lock:
        if _fd < 0 and not (start and _start()):
            return
        try:
            os.write(_fd, line)  # a few bytes: room in the pipe unless the undertaker died
        except OSError:  # it died (killed by someone): carry on without it
            os.close(_fd)
            _fd = -1


def _after_fork_in_child() -> None:
    """A forked child is not the program the undertaker watches: it lets go of the pipe
    (while it held its copy, the program's death would go unseen), and would start its own
    undertaker if it started workers."""
    global _fd
    if _fd >= 0:
        os.close(_fd)
    _fd = -1


os.register_at_fork(after_in_child=_after_fork_in_child)


def _start() -> bool:
    """Start the undertaker; False if it could not be (the program runs on without)."""
    global _fd
    read, write = os.pipe()
    try:
        # posix_spawn, not Popen: nothing waits for it, so no Popen may warn at exit that
        # it still runs. Only stdin (the pipe) and what is inheritable go across.
        os.posix_spawn(
            sys.executable,
            [sys.executable, "-I", "-S", "-c", _PROGRAM],
            os.environ,
            file_actions=[(os.POSIX_SPAWN_DUP2, read, 0)],
            setsid=True,
        )
    except OSError:
        os.close(write)
        return False
    finally:
        os.close(read)
    os.set_blocking(write, False)  # never stalls the event loop; a full pipe means it died
    _fd = write
    return True
