"""Progress bars for ``map`` and ``imap``, drawn by tqdm (the optional extra
``corral[progress]``).

``progress=True`` shows a bar only when stderr is a terminal, so a program whose output goes
to a file or a pipe stays clean; ``"always"`` shows it anyway; ``False`` shows none. The
bar counts calls completed, with their rate, and an ETA when the number of calls is known.
The caller advances it a chunk at a time, from the event loop, and closes it at the end,
on an error or when the caller stops early.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any, Protocol

PROGRESS_CHOICES = "False, True (a bar when stderr is a terminal) or 'always'"


class ProgressBar(Protocol):
    """What ``map`` and ``imap`` need of a bar."""

    def update(self, n: int) -> object:
        """Count n more calls completed."""

    def close(self) -> None:
        """Draw the final state and let go of the stream; idempotent."""


def wants_bar(progress: object) -> bool:
    """Whether ``progress`` asks for a bar now; raises at the call for a value that is
    none of the choices, or when a bar is wanted and tqdm is not installed."""
    if progress is False:
        return False
    if progress is True:
        wanted = _is_terminal(sys.stderr)
    elif isinstance(progress, str) and progress == "always":
        wanted = True
    else:
        raise ValueError(f"progress must be {PROGRESS_CHOICES}, not {progress!r}")
    if wanted:
        _tqdm_class()  # a missing extra is reported at the call, not at the first item
    return wanted


def open_bar(total: int | None, desc: str | None = None) -> ProgressBar:
    """A bar on stderr counting calls: ``total`` of them, or an open count when None.

    Call only after ``wants_bar`` said yes. stderr is looked up now, not at import, so a
    redirected or captured stderr is the one written to.
    """
    bar: ProgressBar = _tqdm_class()(
        total=total, desc=desc, unit="call", file=sys.stderr, dynamic_ncols=True
    )
    return bar


def _is_terminal(stream: Any) -> bool:
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@functools.cache  # a failed import is not cached: installing tqdm later works
def _tqdm_class() -> Any:
    """tqdm's bar class, without tqdm's monitor thread: corral starts no helper threads,
    and the loop updates the bar often enough to keep it current."""
    try:  # imported on first use: a program that never asks for a bar never loads it
        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError as exc:
        raise ImportError(
            "a progress bar needs tqdm, which is not installed: "
            "pip install 'corral[progress]' (or pass progress=False)"
        ) from exc

    # monitor_interval is tqdm's class-level switch for its thread: off in a class of ours
    return type("CorralBar", (tqdm,), {"monitor_interval": 0})
