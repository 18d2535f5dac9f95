"""Facts about processes for the tests: whether one has ended, which fds and children this
one holds, and the suite's leak check."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

# Session-long helper processes, not a test's: multiprocessing's forkserver and resource
# tracker, corral's undertaker.
HELPERS = ("forkserver", "resource_tracker", "corral-undertaker")


ROOT = Path(__file__).resolve().parent.parent


def run_python(
    *args: str, cwd: Path = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a fresh interpreter (this one, with corral from this checkout and the tests
    importable) with args; what it printed, and its exit status."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def open_fds() -> set[int]:
    """The fds this process holds open now."""
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def describe_fds(fds: set[int]) -> list[str]:
    """What each fd is (a file's path, ``socket:[inode]`` with its TCP addresses, a pipe),
    for a leak check's message."""
    connections = {conn.fd: conn for conn in psutil.Process().net_connections(kind="all")}
    described = []
    for fd in sorted(fds):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = "closed since"
        conn = connections.get(fd)
        if conn is not None:
            target += f" {conn.laddr} -> {conn.raddr or '-'} {conn.status}"
        described.append(f"{fd}: {target}")
    return described


def dead(pid: int) -> bool:
    """Whether pid has ended: exited or killed, reaped or a zombie (a process whose parent
    died is reaped by whoever adopted it, perhaps not at once)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def children() -> set[int]:
    """This process's descendants, less the session-long helpers."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if not any(helper in cmdline for helper in HELPERS):
            found.add(child.pid)
    return found


def connections_to_children() -> set[int]:
    """The fds of this process that are TCP connections to one of its child processes, or
    that a server in this process accepted (a Dask scheduler's pooled connection to a
    worker whose other end has gone, closing, no longer names a child). A client's own end,
    connecting to a server, is neither: a client left open is still counted."""
    ports: set[int] = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            ports.update(conn.laddr.port for conn in child.net_connections(kind="tcp"))
    connections = psutil.Process().net_connections(kind="tcp")
    listening = {conn.laddr.port for conn in connections if conn.status == psutil.CONN_LISTEN}
    return {
        conn.fd
        for conn in connections
        if (conn.raddr and conn.raddr.port in ports)
        or (conn.status != psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in listening)
    }


@contextlib.contextmanager
def no_leaks(wait: float = 10) -> Iterator[None]:
    """Fail the block if it leaves a child process or an fd open (allowing wait seconds
    for children to be reaped and fds closed on a slow machine).

    Once Dask is loaded, less the TCP connections between a cluster's scheduler in this
    process and its worker processes: Dask keeps them pooled for reuse, opening more when a
    test is busier than any before it, and closes them with the cluster. And while it waits
    it collects garbage: a socket Dask closed as the test's loop ended is let go only when
    its transport is collected (a client still referenced is not, and stays counted).

    An fd counts as left open when it names the same file or socket at two looks in a
    row: one that names another each time, or is gone, was opened and closed again
    meanwhile (a cluster's connections for its heartbeats), not left behind."""
    children_before, fds_before = children(), open_fds()
    yield
    deadline = time.monotonic() + wait
    previous: dict[int, str] = {}
    steady: set[int] = set()
    while True:
        clustered = "distributed" in sys.modules
        leaked_children = children() - children_before
        leaked_fds = open_fds() - fds_before
        if clustered and leaked_fds:
            leaked_fds -= connections_to_children()
        leaked = _targets(leaked_fds)
        steady = {fd for fd, what in leaked.items() if previous.get(fd) == what}
        if not leaked_children and (not leaked or (previous and not steady)):
            break
        if time.monotonic() > deadline:
            break
        previous = leaked or previous
        if clustered:
            gc.collect()
        time.sleep(0.05)
    assert not leaked_children, f"child processes left behind: {sorted(leaked_children)}"
    assert not steady, f"fds left open: {describe_fds(steady)}"


def _targets(fds: set[int]) -> dict[int, str]:
    """What each of fds names now (its /proc link); those closed meanwhile are left out."""
    targets = {}
    for fd in fds:
        with contextlib.suppress(OSError):
            targets[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return targets
