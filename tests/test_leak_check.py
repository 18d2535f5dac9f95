"""The suite's leak check (``tests.processes.no_leaks``) itself: it fails a block that
leaves an fd open, and passes one whose fds are opened and closed again meanwhile."""

from __future__ import annotations

import os
import threading

import pytest

from tests import processes


def test_an_fd_left_open_fails_the_block() -> None:
    """A pipe made in the block and never closed is named in the failure."""
    r = w = -1
    try:
        with (
            pytest.raises(AssertionError, match=r"fds left open: .*pipe:"),
            processes.no_leaks(wait=0.5),
        ):
            r, w = os.pipe()
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


def test_fds_opened_and_closed_again_meanwhile_are_not_leaks() -> None:
    """An fd another thread keeps open almost all the time, but a new one every 30 ms (as
    a cluster's heartbeat connections come and go), is not counted as left open: no two
    looks (50 ms apart) find the same pipe."""
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            r, w = os.pipe()
            stop.wait(0.03)
            os.close(r)
            os.close(w)

    thread = threading.Thread(target=churn)
    try:
        with processes.no_leaks(wait=2):
            thread.start()
    finally:
        stop.set()
        thread.join(10)
