"""A dead parent takes its workers with it, even when it is SIGKILLed mid-task."""

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

PARENT = """
import asyncio, sys
sys.path.insert(0, {root!r})
import corral
from tests import tasks

async def main():
    async with corral.Pool(2, start_method=sys.argv[1]) as pool:
        pids = [await pool.run(tasks.pid) for _ in range(2)]
        busy = pool.submit(tasks.sleep, 1000)   # one worker deaf to its pipe
        while not any(w._page.started == busy.id for w in pool.workers):
            await asyncio.sleep(0.005)   # until it has started (the test bounds the wait)
        print(" ".join(str(w.pid) for w in pool.workers), flush=True)
        await busy

if __name__ == "__main__":
    asyncio.run(main())
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_workers_die_with_a_sigkilled_parent(tmp_path: Path, method: str) -> None:
    """SIGKILL the pool's process while one worker runs a long task and one is idle: both
    workers are gone within a second (the bound allows for a slow CI machine)."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(root=str(ROOT)))
    parent = subprocess.Popen(
        [sys.executable, str(script), method], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(pids) == 2 and not any(dead(pid) for pid in pids)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        killed = time.monotonic()
        while not all(dead(pid) for pid in pids) and time.monotonic() - killed < 10:
            time.sleep(0.01)
        took = time.monotonic() - killed
        assert all(dead(pid) for pid in pids), "workers outlived their parent"
        assert took < 3.0, f"workers took {took:.2f} s to follow their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()  # type: ignore[union-attr]


GRANDPARENT = """
import asyncio, subprocess, sys, time
sys.path.insert(0, {root!r})
import corral

def start_a_child_then_sleep():
    child = subprocess.Popen(["sleep", "1000"])
    print(child.pid, flush=True)
    time.sleep(1000)

async def main():
    async with corral.Pool(1) as pool:
        await pool.run(start_a_child_then_sleep)

if __name__ == "__main__":
    asyncio.run(main())
"""


@pytest.mark.timeout(60)
def test_a_sigkilled_parent_takes_what_its_workers_started(tmp_path: Path) -> None:
    """SIGKILL the pool's process while a task waits on a process it started: that process
    goes with the worker."""
    script = tmp_path / "parent.py"
    script.write_text(GRANDPARENT.format(root=str(ROOT)))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    grandchild = None
    try:
        assert parent.stdout is not None
        grandchild = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        killed = time.monotonic()
        while not dead(grandchild) and time.monotonic() - killed < 5:
            time.sleep(0.01)
        assert dead(grandchild), "a process the task started outlived the dead parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()  # type: ignore[union-attr]
        if grandchild is not None and not dead(grandchild):
            os.kill(grandchild, signal.SIGKILL)  # the test's own leftover
