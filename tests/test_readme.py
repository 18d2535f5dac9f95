"""The README's quick-start runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    """The README's ```python blocks, in order."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def run_example(tmp_path: Path, marker: str) -> list[str]:
    """Run the README's python block containing marker as a script in a fresh interpreter,
    as a user would; it must succeed and print nothing on stderr. Its stdout lines."""
    (example,) = [block for block in python_blocks() if marker in block]
    script = tmp_path / "example.py"
    script.write_text(example)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout.splitlines()


@pytest.mark.timeout(120)
def test_quick_start_runs(tmp_path: Path) -> None:
    """The first example prints what its comments promise and leaves no worker behind."""
    assert "# one worker process per CPU" in python_blocks()[0]  # the quick start is first
    lines = run_example(tmp_path, "# one worker process per CPU")
    assert lines[0] == str(sum(i * i for i in range(10_000)))
    assert lines[1] == str(sum(i * i for i in range(10)))
    assert lines[2] == str([sum(i * i for i in range(n)) for n in range(1000)])
    assert lines[3] == "42"


@pytest.mark.timeout(120)
def test_queue_example_runs(tmp_path: Path) -> None:
    """The task queue example prints what its comments say."""
    lines = run_example(tmp_path, "corral.TaskQueue()")
    assert lines[0] == "got example.org"
    assert lines[1] == "144"
    assert lines[2].startswith("refused: no worker of this queue serves series='gpu'")
    assert lines[3:] == ["True", "3 workers", "0 pending"]


@pytest.mark.timeout(120)
def test_streams_example_runs(tmp_path: Path) -> None:
    """The streams example prints what its comments say."""
    assert run_example(tmp_path, "pool.iterate(read_rows") == [
        str(sum(range(1_000_000))),
        "[5, 4, 3, 2, 1]",
        "[0, 1, 2] trained",
    ]


@pytest.mark.timeout(120)
def test_executor_example_runs(tmp_path: Path) -> None:
    """The Executor example prints what its comments say."""
    assert run_example(tmp_path, "corral.Executor(2)") == ["27", "[0, 1, 8, 27, 64]"]


@pytest.mark.timeout(120)
def test_dask_example_runs(tmp_path: Path) -> None:
    """The Dask example starts its own local cluster, runs its calls on it (one of them
    in the series its workers declare), prints what its comments say and closes it all."""
    pytest.importorskip("distributed")
    assert run_example(tmp_path, "distributed.LocalCluster(") == [
        "dask 2",
        "[0, 1, 4, 9, 16]",
        "49",
        "[0, 1, 2] trained",
        "LookupError('not here') RemoteTraceback",
    ]
