"""corral as of another git revision, measured side by side with the working tree.

The library ``corral@REV`` (``--libs corral,corral@REV``, or ``--baseline REV``) is corral
as committed at REV: an A/B test of a change on the same machine in the same run. Its
source is a ``git worktree`` of REV in the system's temporary directory, outside the
repository so that no test or tool picks it up, made once per commit and then reused. The
measuring process imports corral from that checkout's ``src/``, and so does every worker it
starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def short_commit(rev: str) -> str:
    """The abbreviated commit REV names, so HEAD, a branch and a hash give one library name."""
    return _git("rev-parse", "--short", "--verify", f"{rev}^{{commit}}")


def worktree(rev: str) -> Path:
    """A clean checkout of the commit REV names, outside the repository; made once, reused."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = Path(tempfile.gettempdir()) / f"corral-at-{commit[:12]}"
    if not path.exists():
        _git("worktree", "prune")  # forgets a checkout whose directory was deleted
        _git("worktree", "add", "--detach", str(path), commit)
    # Reused only if it still is that commit, unedited: the numbers are said to be REV's.
    if _git("rev-parse", "HEAD", cwd=path) != commit or _git(
        "status", "--porcelain", "--untracked-files=no", cwd=path
    ):
        raise RuntimeError(
            f"{path} is not a clean checkout of {commit[:12]}; remove it with"
            f" `git worktree remove --force {path}` and run again"
        )
    return path


def import_corral_from(rev: str) -> Path:
    """Make this process, and every Python process it starts, import corral as of REV.

    Returns the ``src`` directory corral now comes from. Must run before anything imports
    corral. ``PYTHONPATH`` matters as much as ``sys.path``: the forkserver is a fresh
    interpreter that ignores its parent's ``sys.path``, and a worker with the other
    revision's code would speak another wire format.
    """
    if "corral" in sys.modules:
        raise RuntimeError("corral is imported already: too late to choose its revision")
    src = worktree(rev) / "src"
    sys.path.insert(0, str(src))
    inherited = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(src), *([inherited] if inherited else [])])
    return src
