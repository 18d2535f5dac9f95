"""Start-up: a program, its forkserver and its workers import only what each one uses.

Every worker process imports ``corral``, and so does the forkserver before it forks the
first worker; the parent imports the pool's side. Each module loaded where it is not used
delays a program's first answer (issue 14), so these prove, in fresh interpreters, what
each of them loads, and that the public names still answer as they did when everything
loaded at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.processes import ROOT, dead, run_python
from tests.waits import wait_until

# What no process of a program of process pools needs to import: the other kinds of
# worker, Dask, the executor, the Tracker, psutil (only a kill, stats and memory limits
# use it), cloudpickle (only what pickle refuses: a lambda, a closure) and the command
# line's libraries.
NOT_FOR_A_PROCESS_POOL = {
    "cloudpickle",
    "corral._cluster",
    "corral._tracker",
    "corral.cli",
    "corral.executor",
    "corral.workers._dask",
    "corral.workers._dask_outcomes",
    "corral.workers._dask_remote",
    "corral.workers._local",
    "corral.workers._thread",
    "dask",
    "distributed",
    "psutil",
    "rich",
    "tqdm",
}

# What a worker process (and the forkserver) never runs: the pool's side.
PARENT_SIDE = {
    "corral._dispatcher",
    "corral._job",
    "corral._mapping",
    "corral._pool",
    "corral._roster",
    "corral._sources",
    "corral._stats",
    "corral._taskqueue",
    "corral.workers",
}


def output_of(*args: str, cwd: Path = ROOT) -> str:
    """What a fresh interpreter run with args printed; fails with its stderr if it failed."""
    done = run_python(*args, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.timeout(90)
def test_import_corral_loads_only_what_a_worker_needs() -> None:
    """``import corral`` after ``import asyncio`` loads corral's errors and ``report`` and
    nothing else: no pool, no worker kind, no third-party package."""
    loaded = json.loads(
        output_of(
            "-c",
            "import asyncio, json, sys\n"
            "before = set(sys.modules)\n"
            "import corral\n"
            "print(json.dumps(sorted(set(sys.modules) - before)))\n",
        )
    )
    assert set(loaded) <= {
        "__future__",
        "corral",
        "corral._errors",
        "corral._lazy",
        "corral._report",
    }


SCRIPT = """
import asyncio, json, sys
import corral

def modules():
    return sorted(sys.modules)

async def main():
    async with corral.Pool(1) as pool:
        worker = await pool.run(modules)
        print(json.dumps({"parent": sorted(sys.modules), "worker": worker}))

if __name__ == "__main__":
    asyncio.run(main())
"""


@pytest.mark.timeout(90)
def test_a_process_pool_loads_only_what_each_process_uses(tmp_path: Path) -> None:
    """A script that starts a pool of processes (the default start method) and runs a call
    loads neither Dask, psutil, the other worker kinds nor the executor, in the parent or
    in the worker; the worker (forked by a forkserver that loaded the same) loads nothing
    of the pool's side."""
    (tmp_path / "script.py").write_text(SCRIPT)
    loaded = json.loads(output_of("script.py", cwd=tmp_path))  # run as scripts are
    parent, worker = set(loaded["parent"]), set(loaded["worker"])
    assert "corral._pool" in parent and "corral._child" in worker  # what it measures ran
    assert sorted(parent & NOT_FOR_A_PROCESS_POOL) == []
    assert sorted(worker & NOT_FOR_A_PROCESS_POOL) == []
    assert sorted(worker & PARENT_SIDE) == []


@pytest.mark.timeout(90)
def test_public_names_load_at_first_use_and_answer_to_the_public_module() -> None:
    """In a fresh interpreter, each name of ``corral.__all__`` and ``corral.workers.__all__``
    is reachable (``from corral import *`` too), answers to the public module, and is
    listed by ``dir``; the public submodules are reachable after ``import corral`` alone,
    as when everything loaded at once; a ``Job`` the pool hands out answers to ``corral``
    though the program never named ``corral.Job``; a name that does not exist says so."""
    found = json.loads(
        output_of(
            "-c",
            "import json, corral\n"
            "from tests import tasks\n"
            "async def job_module():\n"
            "    async with corral.Pool(1, kind='thread') as pool:\n"
            "        job = pool.submit(tasks.add, 1, 2)\n"
            "        await job\n"
            "        return type(job).__module__\n"
            "import asyncio\n"
            "job = asyncio.run(job_module())\n"
            "workers = corral.workers\n"
            "modules = {n: getattr(corral, n).__module__ for n in corral.__all__}\n"
            "modules.update({n: getattr(workers, n).__module__ for n in workers.__all__})\n"
            "star = {}\n"
            "exec('from corral import *', star)\n"
            "try:\n"
            "    corral.Pol\n"
            "    missing = ''\n"
            "except AttributeError as exc:\n"
            "    missing = str(exc)\n"
            "print(json.dumps({'job': job, 'modules': modules, 'star': sorted(star),\n"
            "    'dir': sorted(set(corral.__all__) - set(dir(corral))),\n"
            "    'workers_dir': sorted(set(workers.__all__) - set(dir(workers))),\n"
            "    'executor': corral.executor.Executor is corral.Executor,\n"
            "    'all': corral.__all__, 'missing': missing}))\n",
        )
    )
    assert found["job"] == "corral"
    wrong = {
        name: module
        for name, module in found["modules"].items()
        if module != ("corral.workers" if name.endswith(("Worker", "WorkerHost")) else "corral")
    }
    assert wrong == {}
    assert found["star"] == sorted(["__builtins__", *found["all"]])
    assert found["dir"] == found["workers_dir"] == []
    assert found["executor"] is True
    assert found["missing"] == "module 'corral' has no attribute 'Pol'"


# A program that has the undertaker started early, then watches a group through it.
EARLY = """
import subprocess, sys, time
from corral import _undertaker
_undertaker.prepare()
_undertaker.prepare()
watched = subprocess.Popen(["sleep", "1000"], process_group=0)
_undertaker.watch(watched.pid)
print(watched.pid, flush=True)
time.sleep(1000)
"""


def undertakers_of(pid: int) -> list[psutil.Process]:
    """The undertakers process pid started (its children running the undertaker's code)."""
    found = []
    for child in psutil.Process(pid).children():
        try:
            if "corral-undertaker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


@pytest.mark.timeout(60)
def test_an_undertaker_started_early_is_the_one_that_watches() -> None:
    """``prepare`` starts the undertaker before any worker exists (a pool calls it while its
    forkserver boots); later calls and ``watch`` start no other, and the group watched
    through it dies when the program is SIGKILLed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    program = subprocess.Popen(
        [sys.executable, "-c", EARLY], stdout=subprocess.PIPE, text=True, env=env
    )
    watched = None
    try:
        assert program.stdout is not None
        watched = int(program.stdout.readline())
        assert len(undertakers_of(program.pid)) == 1
        os.kill(program.pid, signal.SIGKILL)
        program.wait(timeout=30)
        wait_until(lambda: dead(watched), timeout=10)  # else the group outlived the program
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()
        program.stdout.close()  # type: ignore[union-attr]
        if watched is not None and not dead(watched):
            os.kill(watched, signal.SIGKILL)  # the test's own leftover


SIGNAL_MASK = """
import asyncio, multiprocessing.forkserver as fs, signal
import corral


def blocked(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigBlk:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    raise AssertionError("no SigBlk line")


async def main():
    async with corral.Pool(1, start_method="forkserver") as pool:
        assert await pool.run(abs, -1) == 1
        print(blocked(fs._forkserver._forkserver_pid))


if __name__ == "__main__":
    asyncio.run(main())
"""


@pytest.mark.timeout(60)
def test_the_forkserver_is_born_with_sigint_blocked(tmp_path: Path) -> None:
    """In a fresh program, the forkserver corral starts has SIGINT blocked, so a Ctrl-C
    cannot kill a worker that is still starting. multiprocessing's resource tracker, which
    the forkserver starts first, unblocked SIGINT as its start returned, and the forkserver
    and every worker it forked were born open to it (a Ctrl-C during a worker's start-up
    ended it with code 1, logged as a failed start)."""
    script = tmp_path / "mask.py"
    script.write_text(SIGNAL_MASK)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=50, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]
