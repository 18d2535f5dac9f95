"""Progress bars of ``map`` and ``imap``: none unless asked for, none on a stderr that is
not a terminal unless ``"always"``, a bar with its total, rate and final count otherwise,
closed on an error or an early stop, a clear ImportError when tqdm is missing, a bar on a
real terminal (a pseudo-terminal) with ``progress=True`` and nothing on a pipe or a file.
The widget a notebook shows is tested in a real kernel, in test_notebook.py.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import corral
from corral import _progress
from tests import tasks
from tests.waits import bounded, until

T = TypeVar("T")

BOUND = 60.0
ROOT = Path(__file__).resolve().parent.parent


async def drain(iterator: object) -> list[object]:
    """Every value of an async iterator, within the bound."""

    async def run() -> list[object]:
        return [value async for value in iterator]  # type: ignore[attr-defined]

    return await bounded(run())


def fail_on_30(x: int) -> int:
    """x, except for 30, which raises (a task of this module, run by workers)."""
    if x == 30:
        raise tasks.TaskError("bad item 30")
    return x


def last_line(err: str) -> str:
    """The bar's final state: the text after its last carriage return."""
    return err.rstrip("\n").rsplit("\r", 1)[-1]


async def test_no_bar_unless_asked_and_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """By default, and with ``progress=True`` while stderr is not a terminal (here it is
    captured), map and imap write nothing to stderr."""
    async with corral.Pool(2, kind="thread") as pool:
        for progress in (False, True):
            assert await bounded(pool.map(tasks.square, range(100), progress=progress)) == [
                i * i for i in range(100)
            ]
            got = await drain(pool.imap(tasks.square, range(100), progress=progress))
            assert got == [i * i for i in range(100)]
    assert capsys.readouterr().err == ""


async def test_always_draws_a_bar_with_total_and_rate(capsys: pytest.CaptureFixture[str]) -> None:
    """``progress="always"`` draws a bar on stderr even when it is not a terminal: it
    names the function, ends at the total, shows a rate, and is closed (ends its line).
    An input of unknown length is counted without a total."""
    async with corral.Pool(2) as pool:
        await bounded(pool.map(tasks.square, range(100), chunksize=10, progress="always"))
        err = capsys.readouterr().err
        assert "map square" in last_line(err)
        assert "100/100" in last_line(err)
        assert "call/s" in err or "s/call" in err
        assert err.endswith("\n")

        await drain(pool.imap(tasks.square, range(200), progress="always"))
        err = capsys.readouterr().err
        assert "imap square" in last_line(err)
        assert "200/200" in last_line(err)
        assert err.endswith("\n")

        await drain(pool.imap(tasks.square, (i for i in range(300)), progress="always"))
        err = capsys.readouterr().err
        assert "300call" in last_line(err)
        assert "/300" not in err
        assert capsys.readouterr().out == ""


async def test_bar_is_closed_on_error_and_on_break(capsys: pytest.CaptureFixture[str]) -> None:
    """A map or imap that fails, and an imap the consumer leaves early, close their bar
    (its line is ended) short of the total, and their jobs are cancelled."""
    async with corral.Pool(2) as pool:
        with pytest.raises(tasks.TaskError):
            await bounded(pool.map(fail_on_30, range(100), chunksize=1, progress="always"))
        err = capsys.readouterr().err
        assert err.endswith("\n")
        assert "100/100" not in err

        with pytest.raises(tasks.TaskError):
            await drain(pool.imap(fail_on_30, range(100), chunksize=1, progress="always"))
        err = capsys.readouterr().err
        assert err.endswith("\n")
        assert "100/100" not in err

        async for _ in pool.imap(tasks.sleep, [0.0] + [1000.0] * 9, progress="always"):
            break
        err = capsys.readouterr().err
        assert err.endswith("\n")
        assert "/10" in err
        await until(lambda: pool.stats().in_flight == 0)


@pytest.fixture
def without_tqdm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``import tqdm`` fail in this process, as when the extra is not installed."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    _progress._tqdm_class.cache_clear()
    yield
    _progress._tqdm_class.cache_clear()


@pytest.mark.usefixtures("without_tqdm")
async def test_missing_tqdm_is_reported_at_the_call() -> None:
    """Without tqdm, asking for a bar raises ImportError naming the extra to install, at
    the call; ``progress=True`` with no terminal needs no bar, so it works without it."""
    async with corral.Pool(1, kind="thread") as pool:
        with pytest.raises(ImportError, match=r"pip install 'corral\[progress\]'"):
            pool.imap(tasks.square, range(3), progress="always")
        with pytest.raises(ImportError, match=r"pip install 'corral\[progress\]'"):
            await bounded(pool.map(tasks.square, range(3), progress="always"))
        assert await bounded(pool.map(tasks.square, range(3), progress=True)) == [0, 1, 4]
        assert await drain(pool.imap(tasks.square, range(3), progress=True)) == [0, 1, 4]


def run_script(script: str, **streams: Any) -> subprocess.CompletedProcess[str]:
    """Run a Python script (dedented) in a fresh interpreter at the project's root, with
    stdout captured and the given ``stderr``; fails the test if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        timeout=BOUND,
        check=False,
        **streams,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done


def run_on_a_terminal(script: str) -> str:
    """Run a Python script (dedented) with its stderr on a pseudo-terminal of 24 rows by
    100 columns; return what it wrote there."""
    leader, follower = os.openpty()
    try:
        # A new pty says 0 by 0: no room for a bar.
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env, stderr=follower
        ) as child:
            os.close(follower)
            follower = -1
            output = _read_until_closed(leader, BOUND)
            assert child.wait(timeout=BOUND) == 0, output
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    return output


# map and imap with progress=True on a thread pool, then which of the modules a bar could
# need were loaded, on stdout.
MAP_AND_IMAP = textwrap.dedent(
    """
    import asyncio
    import sys
    import corral
    from tests import tasks

    async def main():
        async with corral.Pool(2, kind="thread") as pool:
            assert await pool.map(tasks.square, range(50), chunksize=5, progress=True) == [
                x * x for x in range(50)
            ]
            async for _ in pool.imap(tasks.square, range(30), progress=True):
                pass

    asyncio.run(main())
    print(sorted(name for name in ("IPython", "ipykernel", "ipywidgets", "tqdm")
                 if name in sys.modules))
    """
)


def test_progress_true_draws_on_a_terminal() -> None:
    """With stderr on a (pseudo-)terminal, ``progress=True`` draws the bars of map and
    imap, each ending at its total."""
    output = run_on_a_terminal(MAP_AND_IMAP)
    assert "map square" in output
    assert "50/50" in output
    assert "imap square" in output
    assert "30/30" in output


@pytest.mark.parametrize("where", ["pipe", "file"])
def test_progress_true_is_silent_on_a_pipe_and_a_file(where: str, tmp_path: Path) -> None:
    """With stderr on a pipe or a file, ``progress=True`` writes nothing there, and the
    choice loads nothing: neither tqdm nor IPython, ipykernel or ipywidgets (looking for a
    notebook only reads ``sys.modules``)."""
    if where == "pipe":
        done = run_script(MAP_AND_IMAP, stderr=subprocess.PIPE)
        err = done.stderr
    else:
        log = tmp_path / "stderr.log"
        with log.open("w") as stderr:
            done = run_script(MAP_AND_IMAP, stderr=stderr)
        err = log.read_text()
    assert err == ""
    assert done.stdout.splitlines()[-1] == "[]"


def test_an_ipython_shell_that_is_no_kernel_is_no_notebook() -> None:
    """A program that imported ipykernel and runs an IPython shell without a kernel (a
    terminal IPython, a script) is not a notebook: ``progress=True`` draws the text bar on
    its terminal, not a widget."""
    output = run_on_a_terminal(
        textwrap.dedent(
            """
        import ipykernel.zmqshell
        from IPython.core.interactiveshell import InteractiveShell
        from corral import _progress

        InteractiveShell.instance()  # what get_ipython() now returns: a shell, no kernel
        assert not _progress.in_notebook()
        """
        )
        + MAP_AND_IMAP
    )
    assert "map square" in output
    assert "50/50" in output
    assert "30/30" in output


def _read_until_closed(fd: int, timeout: float) -> str:
    """Everything written to a pty until every writer has closed it (read gives EIO)."""
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, "the child wrote nothing for too long"
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child's end is closed
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")
