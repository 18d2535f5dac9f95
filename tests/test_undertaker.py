"""``_undertaker``: when the program dies, even by SIGKILL, the process groups of its
workers die with it, and only those it still watches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import dead

ROOT = Path(__file__).resolve().parent.parent

# A program that starts two processes, each leading a group of its own (as a worker
# does), has the undertaker watch both, forgets the second, and waits to be killed.
PROGRAM = """
import subprocess, sys, time
sys.path.insert(0, {src!r})
from corral import _undertaker
watched = subprocess.Popen(["sleep", "1000"], process_group=0)
forgotten = subprocess.Popen(["sleep", "1000"], process_group=0)
_undertaker.watch(watched.pid)
_undertaker.watch(forgotten.pid)
_undertaker.forget(forgotten.pid)
print(watched.pid, forgotten.pid, flush=True)
time.sleep(1000)
"""


@pytest.mark.timeout(60)
def test_a_sigkilled_program_takes_the_groups_it_watches() -> None:
    """SIGKILL the program: the group it watches is SIGKILLed within seconds; the group it
    forgot lives on."""
    program = subprocess.Popen(
        [sys.executable, "-c", PROGRAM.format(src=str(ROOT / "src"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    watched = forgotten = None
    try:
        assert program.stdout is not None
        watched, forgotten = map(int, program.stdout.readline().split())
        os.kill(program.pid, signal.SIGKILL)
        program.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not dead(watched) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dead(watched), "a watched group outlived the program"
        assert not dead(forgotten), "a forgotten group was killed"
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()
        program.stdout.close()  # type: ignore[union-attr]
        for pid in (watched, forgotten):
            if pid is not None and not dead(pid):
                os.kill(pid, signal.SIGKILL)  # the test's own leftovers
