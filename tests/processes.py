"""Facts about processes for the tests: whether one has ended, which fds this one holds."""

from __future__ import annotations

import os

import psutil


def open_fds() -> set[int]:
    """The fds this process holds open now."""
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def dead(pid: int) -> bool:
    """Whether pid has ended: exited or killed, reaped or a zombie (a process whose parent
    died is reaped by whoever adopted it, perhaps not at once)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
