"""Functions and classes of the user's ``__main__``, in real scripts under every start method.

Each test runs a script in a fresh interpreter (as a file, as ``python -m``, as
``python -c``), which starts a pool, calls functions of its own ``__main__`` and prints what
it saw as JSON. The script also records the bytes of every call frame its pool writes to
the worker's pipe (definitions sent ahead included), so what travels is observed on the
wire, not through timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = '''
import asyncio, json, multiprocessing, sys
import corral
from corral.workers import _process

frames = []  # bytes of each call frame written, with any definition sent ahead of it
_framed = _process.framed


def recording(kind, job, payload, region, taken):
    buffers = _framed(kind, job, payload, region, taken)
    frames.append(sum(memoryview(b).nbytes for b in buffers))
    return buffers


_process.framed = recording


class Point:
    def __init__(self, x):
        self.x = x


def square(x):
    return x * x


def is_point(p):
    return isinstance(p, Point)


def is_own_point(p):
    # isinstance of the class the worker's own __main__ defines (no such class: False)
    return isinstance(p, getattr(sys.modules["__main__"], "Point", ()))


def twice_x(p):
    return p.x * 2


def make_point(x):
    return Point(x)


def runs_itself():
    # True when the worker runs its own __main__'s function, not a copy.
    return getattr(sys.modules["__main__"], "runs_itself", None) is runs_itself


def is_itself(x):
    # map passes it to its chunk runner as an argument: by name too where it can go so.
    return getattr(sys.modules["__main__"], "is_itself", None) is is_itself


def squares_in_a_pool(n):
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.map(square, range(n))


def shadowed():
    return "top level"


def scaled(x):
    return x * factor  # the main block binds factor: spawned workers never do


def uses_scaled(x):
    return scaled(x)


loaded = None


def load(value):
    global loaded
    loaded = value


def use_loaded():
    return loaded


def redefined():
    return "first"


async def sizes(pool, fn):
    """The frames of two calls of fn, and their results."""
    del frames[:]
    results = [await pool.run(fn, 1), await pool.run(fn, 2)]
    return {"results": results, "frames": list(frames)}


async def main(method):
    global redefined
    facts = {}
    async with corral.Pool(1, start_method=method) as pool:
        facts["square"] = await pool.run(square, 3)
        facts["runs_itself"] = await pool.run(runs_itself)
        facts["map_itself"] = await pool.map(is_itself, [1, 2])
        facts["map_points"] = await pool.map(twice_x, [Local(1), Point(2)])
        facts["is_point"] = await pool.run(is_point, Point(1))
        facts["own_class"] = await pool.run(is_own_point, Point(1))
        facts["main_block_class"] = await pool.run(twice_x, Local(4))
        facts["point_back"] = isinstance(await pool.run(make_point, 2), Point)
        try:
            facts["mp_pool"] = await pool.run(squares_in_a_pool, 3)
        except Exception as exc:
            facts["mp_pool"] = repr(exc)
        facts["shadowed"] = await pool.run(shadowed)
        facts["main_block_global"] = await pool.run(uses_scaled, 2)
        await pool.broadcast(load, "model")
        facts["loaded"] = await pool.run(use_loaded)
        first = await pool.run(redefined)

        def redefined():
            return "second"

        facts["redefined"] = [first, await pool.run(redefined)]
        facts["by_name"] = await sizes(pool, square)
        facts["main_block"] = await sizes(pool, in_main_block)
        facts["lambda"] = await sizes(pool, lambda x: x * 10)
    async with corral.Pool(1, start_method=method, initializer=set_up, initargs=(5,)) as pool:
        facts["main_block_initializer"] = await pool.run(use_loaded)
    print(json.dumps(facts))


if __name__ == "__main__":

    def in_main_block(x):
        return x + 100

    def set_up(value):  # an initializer spawned workers lack: it goes by value
        load(value)

    def shadowed():
        return "main block"

    factor = 7

    class Local:  # spawned workers lack it: its instances go by value
        def __init__(self, x):
            self.x = x

    asyncio.run(main(sys.argv[-1]))
'''

METHODS = ["fork", "forkserver", "spawn"]


def run(tmp_path: Path, how: str, method: str) -> dict[str, Any]:
    """Run SCRIPT as a file, a module (``-m app.script``), a package's ``__main__``
    (``-m app``) or a command (``-c``); its facts."""
    package = tmp_path / "app"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "script.py").write_text(SCRIPT)
    (package / "__main__.py").write_text(SCRIPT)
    command = {
        "file": [sys.executable, str(package / "script.py"), method],
        "module": [sys.executable, "-m", "app.script", method],
        "package": [sys.executable, "-m", "app", method],
        "command": [sys.executable, "-c", SCRIPT, method],
    }[how]
    done = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    facts: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return facts


def assert_sent_once(facts: dict[str, Any], first: int, second: int) -> None:
    """Both calls gave their results; the first call's frames carried the definition,
    the second's only the call (as small as a call by name)."""
    assert facts["results"] == [first, second]
    with_definition, alone = facts["frames"]
    assert alone < 200 < with_definition


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["file", "module"])
@pytest.mark.parametrize("method", METHODS)
def test_a_scripts_functions_go_by_name_and_keep_their_identity(
    tmp_path: Path, how: str, method: str
) -> None:
    """Run as ``python x.py`` or ``python -m pkg.mod``, a script's functions and classes
    reach the worker by name: the worker runs its own ``__main__``'s copy, an instance of
    the script's class is an instance of the worker's class (both ways), and a task can
    start a multiprocessing pool on another of the script's functions, and what one
    function stores in a global (a broadcast, or an initializer the main block defines,
    loading a model) the next one finds. A
    function or class the main block defines, or redefines, or one rebound after the pool
    started, or a function that reads (itself or through another) a global the main block
    binds, goes by value and runs as the parent has it; a by-value function is sent once,
    then named."""
    facts = run(tmp_path, how, method)
    assert facts["square"] == 9
    assert facts["runs_itself"] is True
    assert facts["map_itself"] == [True, True]
    assert facts["map_points"] == [2, 4]  # a main-block class's instance beside it: by value
    assert facts["is_point"] is True
    assert facts["own_class"] is True
    assert facts["main_block_class"] == 8
    assert facts["point_back"] is True
    assert facts["mp_pool"] == [0, 1, 4]
    assert facts["loaded"] == "model"  # one module's globals, as the script wrote them
    assert facts["shadowed"] == "main block"
    assert facts["main_block_global"] == 14  # by value: as the parent has it
    assert facts["redefined"] == ["first", "second"]
    assert facts["main_block_initializer"] == 5
    small, same = facts["by_name"]["frames"]
    assert facts["by_name"]["results"] == [1, 4]
    assert small == same < 200
    assert_sent_once(facts["main_block"], 101, 102)
    assert_sent_once(facts["lambda"], 10, 20)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["command", "package"])
@pytest.mark.parametrize("method", METHODS)
def test_functions_a_worker_cannot_import_go_by_value_once(
    tmp_path: Path, how: str, method: str
) -> None:
    """Under ``python -c`` (no file) and ``python -m pkg`` (a package's ``__main__``,
    which multiprocessing never runs again in a spawned worker) the worker cannot import
    ``__main__``: every function goes by value and still runs, instances of its classes
    still pass ``isinstance`` (cloudpickle maps copies of one class to one class), and
    each function is sent to a worker once, later calls naming it."""
    facts = run(tmp_path, how, method)
    assert facts["square"] == 9
    assert facts["runs_itself"] is False  # a copy: nothing to import it from
    assert facts["map_itself"] == [False, False]
    assert facts["map_points"] == [2, 4]
    assert facts["is_point"] is True
    assert facts["main_block_class"] == 8
    assert facts["point_back"] is True
    assert facts["shadowed"] == "main block"
    assert facts["main_block_global"] == 14
    assert facts["redefined"] == ["first", "second"]
    # square went to this worker once already, for the first fact: named since.
    small, same = facts["by_name"]["frames"]
    assert facts["by_name"]["results"] == [1, 4]
    assert small == same < 200
    assert_sent_once(facts["main_block"], 101, 102)
    assert_sent_once(facts["lambda"], 10, 20)
