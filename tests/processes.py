"""Facts about processes for the tests: whether one has ended, which fds this one holds."""

from __future__ import annotations

import os

import psutil


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
