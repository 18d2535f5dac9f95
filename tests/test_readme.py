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


@pytest.mark.timeout(120)
def test_quick_start_runs(tmp_path: Path) -> None:
    """The first example, saved as a script and run in a fresh interpreter (as a user
    would), prints what its comments promise and leaves no worker behind."""
    script = tmp_path / "quick_start.py"
    script.write_text(python_blocks()[0])
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == str(sum(i * i for i in range(10_000)))
    assert lines[1] == str(sum(i * i for i in range(10)))
    assert lines[2] == str([sum(i * i for i in range(n)) for n in range(1000)])
    assert lines[3] == "42"
    assert done.stderr == ""


@pytest.mark.timeout(120)
def test_queue_example_runs(tmp_path: Path) -> None:
    """The task queue example runs as a script and prints what its comments say."""
    script = tmp_path / "queue_example.py"
    (example,) = [block for block in python_blocks() if "corral.TaskQueue()" in block]
    script.write_text(example)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "got example.org"
    assert lines[1] == "144"
    assert lines[2].startswith("refused: no worker of this queue serves series='gpu'")
    assert lines[3:] == ["True", "3 workers", "0 pending"]
    assert done.stderr == ""


@pytest.mark.timeout(120)
def test_streams_example_runs(tmp_path: Path) -> None:
    """The streams example runs as a script and prints what its comments say."""
    script = tmp_path / "streams_example.py"
    (example,) = [block for block in python_blocks() if "pool.iterate(read_rows" in block]
    script.write_text(example)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        str(sum(range(1_000_000))),
        "[5, 4, 3, 2, 1]",
        "[0, 1, 2] trained",
    ]
    assert done.stderr == ""


@pytest.mark.timeout(120)
def test_executor_example_runs(tmp_path: Path) -> None:
    script = tmp_path / "executor_example.py"
    (example,) = [block for block in python_blocks() if "corral.Executor(2)" in block]
    script.write_text(example)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["27", "[0, 1, 8, 27, 64]"]
    assert done.stderr == ""
