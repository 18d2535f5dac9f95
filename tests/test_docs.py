"""The README and the documentation site: every ```python block runs as written, prints
what its Output block shows, the API reference covers every public name, and the site
builds under ``mkdocs build --strict``.

A ```python block is a whole script, run as a user would run it: saved to a file and run
by a fresh interpreter, in an empty directory. A fragment that cannot run alone is written
as another language (```pycon, ```text) by its author. A block may be followed, with only
blank lines between, by a ```text block titled Output (```text title="Output"), which the
site shows as what the script prints: the test holds it to exactly that.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]

# Seconds one example may run: the slowest start a Dask cluster, and CI is a slow, noisy
# 2-core machine shared with other test files.
EXAMPLE_BOUND = 100

# An opening or closing fence: its indent, its backticks, and the info string after them.
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^`]*)$")
OUTPUT_INFO = re.compile(r'^text\s+title="Output"$')
# What a Python problem leaves on stderr: a traceback, or a warning printed by `warnings`
# ("path:line: ResourceWarning: ..."). A page's example may log to stderr on purpose.
PROBLEM = re.compile(r"^Traceback \(most recent call last\):$|^\S.*:\d+: \w*Warning: ", re.M)


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    path: Path
    line: int  # of its opening fence, counted from 1
    info: str  # what follows the opening backticks: the language, a title
    code: str

    @property
    def language(self) -> str:
        return self.info.split(maxsplit=1)[0] if self.info.strip() else ""

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Example:
    """A ```python block and what it must print (None: no Output block follows it)."""

    block: Block
    output: str | None

    def __str__(self) -> str:
        return str(self.block)


def blocks(path: Path) -> list[tuple[Block, bool]]:
    """The fenced blocks of path in order, each with whether only blank lines separate it
    from the block before it. A fence closes at a line of at least as many backticks."""
    found: list[tuple[Block, bool]] = []
    lines = path.read_text().splitlines()
    last_end = -2  # index of the line closing the previous block
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, ticks = opening["indent"], opening["ticks"]
        end = i + 1
        while end < len(lines) and not re.fullmatch(rf"[ \t]*`{{{len(ticks)},}}[ \t]*", lines[end]):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: a fence never closed")
        body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
        adjacent = all(not line.strip() for line in lines[last_end + 1 : i])
        block = Block(path, i + 1, opening["info"].strip(), "".join(f"{b}\n" for b in body))
        found.append((block, adjacent and last_end >= 0))
        last_end = i = end
        i += 1
    return found


def examples() -> list[Example]:
    """Every ```python block of the README and of docs/, with its Output block if any."""
    found: list[Example] = []
    for path in PAGES:
        page = blocks(path)
        for index, (block, _) in enumerate(page):
            if block.language != "python":
                continue
            output = None
            if index + 1 < len(page):
                after, adjacent = page[index + 1]
                if adjacent and OUTPUT_INFO.match(after.info):
                    output = after.code
            found.append(Example(block, output))
    return found


def check_quick_start(lines: list[str]) -> None:
    """The quick start prints what its comments promise."""
    assert lines[0] == str(sum(i * i for i in range(10_000)))
    assert lines[1] == str(sum(i * i for i in range(10)))
    assert lines[2] == str([sum(i * i for i in range(n)) for n in range(1000)])
    assert lines[3] == "42"


# Checks of examples whose output is too long to show in an Output block, by a line that
# marks the block: each marker must be in exactly one example.
CHECKS: dict[str, Callable[[list[str]], None]] = {
    "# one worker process per CPU": check_quick_start,
}

EXAMPLES = examples()


def test_examples_found() -> None:
    """The collection sees the README's quick start first, and the site's examples: a
    parser that silently found nothing would pass every other test here."""
    assert EXAMPLES[0].block.path == README
    assert "# one worker process per CPU" in EXAMPLES[0].block.code
    assert sum(example.block.path != README for example in EXAMPLES) >= 10
    for marker in CHECKS:
        assert len([e for e in EXAMPLES if marker in e.block.code]) == 1, marker


def test_output_blocks_follow_examples() -> None:
    """Every Output block directly follows a ```python block, so none goes unchecked."""
    for path in PAGES:
        page = blocks(path)
        for index, (block, adjacent) in enumerate(page):
            if OUTPUT_INFO.match(block.info):
                before = page[index - 1][0] if index else None
                assert adjacent and before is not None and before.language == "python", (
                    f"{block}: an Output block must follow a ```python block"
                )


@pytest.mark.timeout(EXAMPLE_BOUND + 30)
@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_example_runs(example: Example, tmp_path: Path) -> None:
    """The block, saved as a script and run by a fresh interpreter in an empty directory,
    exits 0 with no traceback or warning on stderr, prints its Output block exactly, and
    passes the check its marker names. Warnings are shown (``-W default``), so an example
    that leaves a pool or a file unclosed (a ``ResourceWarning``) fails."""
    script = tmp_path / "example.py"
    script.write_text(example.block.code)
    done = subprocess.run(
        [sys.executable, "-W", "default", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_BOUND,
        check=False,
    )
    assert done.returncode == 0, f"{example} exited {done.returncode}:\n{done.stderr}"
    assert PROBLEM.search(done.stderr) is None, f"{example} wrote on stderr:\n{done.stderr}"
    if example.output is not None:
        assert done.stdout == example.output, f"{example} printed:\n{done.stdout}"
    for marker, check in CHECKS.items():
        if marker in example.block.code:
            check(done.stdout.splitlines())


def test_reference_covers_public_names() -> None:
    """Every public name of corral and corral.workers has its entry in the API reference
    (a ``::: corral.Name`` directive on some page), so a new name cannot go undocumented."""
    import corral
    import corral.workers

    directives = {
        line.removeprefix(":::").strip()
        for path in PAGES
        for line in path.read_text().splitlines()
        if line.startswith(":::")
    }
    public = [f"corral.{name}" for name in corral.__all__]
    public += [f"corral.workers.{name}" for name in corral.workers.__all__]
    assert [name for name in public if name not in directives] == []


@pytest.mark.timeout(300)
def test_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` passes: every page is in the nav, every link, anchor,
    snippet (the README's quick start, BENCHMARKS.md) and API reference resolves, and the
    docstrings it renders parse without a warning."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "reference" / "pool" / "index.html").exists()
