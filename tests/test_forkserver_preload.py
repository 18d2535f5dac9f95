"""New forkserver workers do not import again what the main module imported, and the
program's event loop serves on while the forkserver imports it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.processes import ROOT, run_python

HEAVY = """
import os
with open({log!r}, "a") as log:
    log.write(f"{{os.getpid()}}\\n")   # one line per process that imports this module
"""

SCRIPT = """
import asyncio, os, sys
sys.path.insert(0, {root!r})
import heavy_helper   # stands for numpy, pandas, ...: costly to import
import corral
from tests import tasks

async def main():
    async with corral.Pool(1) as pool:
        for _ in range(4):   # four workers die and are replaced
            try:
                await pool.run(tasks.exit_now, 1)
            except corral.WorkerLostError:
                pass
        print(await pool.run(tasks.add, 2, 3))

if __name__ == "__main__":
    asyncio.run(main())
"""


@pytest.mark.timeout(90)
def test_workers_find_the_main_modules_imports_preloaded(tmp_path: Path) -> None:
    """A module the main script imports is imported by the parent and once by the
    forkserver, not again by each of the five workers the script goes through (Python
    3.11's forkserver means to preload the main module but does not)."""
    log = tmp_path / "imports.log"
    (tmp_path / "heavy_helper.py").write_text(HEAVY.format(log=str(log)))
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    done = run_python(script.name, cwd=tmp_path, timeout=80)  # from its folder, as usual
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "5"
    importers = log.read_text().split()
    assert len(importers) == 2, f"imported by {len(importers)} processes: {importers}"


SLOW = """
import time
time.sleep({seconds})   # stands for numpy, torch, ...: seconds to import
"""

TICKING = """
import asyncio, multiprocessing.forkserver, sys, time
sys.path.insert(0, {root!r})
import slow_helper
import corral
from tests import tasks

async def main():
    gaps = []
    async def tick():
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    ticking = asyncio.create_task(tick())
    started = time.perf_counter()
    if {cancel_first}:  # a first start, cancelled once the forkserver boots
        first = corral.Pool(1)
        starting = asyncio.create_task(first.start())
        server = multiprocessing.forkserver._forkserver
        async with asyncio.timeout(30):
            while server._forkserver_pid is None:
                await asyncio.sleep(0.01)
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await first.terminate()
    async with corral.Pool(2) as pool:
        up = time.perf_counter() - started
        print(await pool.run(tasks.add, 2, 3), f"{{up:.3f}}", f"{{max(gaps):.3f}}")
    ticking.cancel()

if __name__ == "__main__":
    asyncio.run(main())
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cancel_first", [False, True], ids=["start", "cancelled-start-first"])
def test_the_loop_serves_on_while_the_forkserver_preloads(
    tmp_path: Path, cancel_first: bool
) -> None:
    """The first pool's start waits for the forkserver's preloading (here a module the
    script imports that takes 1.5 s) on the event loop: other tasks keep running, where
    multiprocessing would block the loop in a read for all of it. A start cancelled
    meanwhile leaves the boot to the next."""
    seconds = 1.5
    (tmp_path / "slow_helper.py").write_text(SLOW.format(seconds=seconds))
    script = tmp_path / "script.py"
    script.write_text(TICKING.format(root=str(ROOT), cancel_first=cancel_first))
    done = run_python(script.name, cwd=tmp_path, timeout=80)
    assert done.returncode == 0, done.stderr
    answer, up, longest_stall = done.stdout.split()
    assert answer == "5"
    assert float(up) >= seconds  # the forkserver did import it before the first worker
    assert float(longest_stall) < seconds / 2, f"the loop stood still {longest_stall} s"
