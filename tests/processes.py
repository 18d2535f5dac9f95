"""Facts about processes for the tests: whether one has ended."""

from __future__ import annotations

import psutil


def dead(pid: int) -> bool:
    """Whether pid has ended: exited or killed, reaped or a zombie (a process whose parent
    died is reaped by whoever adopted it, perhaps not at once)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
