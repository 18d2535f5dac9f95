"""Progress bars for ``map`` and ``imap``, drawn by tqdm: a text bar on a terminal (the
optional extra ``corral[progress]``), a widget in a Jupyter notebook (``corral[notebook]``:
tqdm and ipywidgets).

``progress=True`` shows a bar where someone is watching: in a notebook (the code runs in a
Jupyter kernel), or when stderr is a terminal; a program whose output goes to a file or a
pipe stays clean. ``"always"`` shows one anyway (on stderr when no notebook is there);
``False`` shows none. The bar counts calls completed, with their rate, and an ETA when the
number of calls is known. The caller advances it a chunk at a time, from the event loop,
and closes it at the end, on an error or when the caller stops early.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any, Protocol

PROGRESS_CHOICES = "False, True (a bar in a notebook or when stderr is a terminal) or 'always'"


class ProgressBar(Protocol):
    """What ``map`` and ``imap`` need of a bar."""

    def update(self, n: int) -> object:
        """Count n more calls completed."""

    def close(self) -> None:
        """Draw the final state and let go of the stream; idempotent."""


def wants_bar(progress: object) -> bool:
    """Whether ``progress`` asks for a bar now; raises at the call for a value that is
    none of the choices, or when a bar is wanted and its extra is not installed."""
    if progress is False:
        return False
    if progress is True:
        wanted = in_notebook() or _is_terminal(sys.stderr)
    elif isinstance(progress, str) and progress == "always":
        wanted = True
    else:
        raise ValueError(f"progress must be {PROGRESS_CHOICES}, not {progress!r}")
    # A missing extra is reported at the call, not at the first item.
    if wanted and in_notebook():
        _notebook_class()
    elif wanted:
        _tqdm_class()
    return wanted


def open_bar(total: int | None, desc: str | None = None) -> ProgressBar:
    """A bar counting calls: ``total`` of them, or an open count when None. A widget shown
    in the cell running the call when in a notebook, else text on stderr.

    Call only after ``wants_bar`` said yes. stderr is looked up now, not at import, so a
    redirected or captured stderr is the one written to.
    """
    bar: ProgressBar
    if in_notebook():
        bar = _notebook_class()(total=total, desc=desc, unit="call", dynamic_ncols=True)
    else:
        bar = _tqdm_class()(
            total=total, desc=desc, unit="call", file=sys.stderr, dynamic_ncols=True
        )
    return bar


def in_notebook() -> bool:
    """Whether this code runs in a Jupyter kernel (a notebook, JupyterLab, VS Code), where
    output goes to a front end that can show a widget.

    Cheap enough for every call, and loads nothing: outside a kernel ipykernel is not in
    ``sys.modules`` and IPython is never imported here. A kernel's shell is the one with a
    ``kernel``; a terminal IPython's shell has none, and a program that merely imported
    ipykernel has no shell at all.
    """
    if "ipykernel" not in sys.modules:
        return False
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return getattr(shell, "kernel", None) is not None


def _is_terminal(stream: Any) -> bool:
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@functools.cache  # a failed import is not cached: installing tqdm later works
def _tqdm_class() -> Any:
    """tqdm's text bar class, without tqdm's monitor thread: corral starts no helper
    threads, and the loop updates the bar often enough to keep it current."""
    try:  # imported on first use: a program that never asks for a bar never loads it
        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError as exc:
        raise ImportError(
            "a progress bar needs tqdm, which is not installed: "
            "pip install 'corral[progress]' (or pass progress=False)"
        ) from exc
    return _without_monitor(tqdm)


@functools.cache
def _notebook_class() -> Any:
    """tqdm's widget bar class, without its monitor thread (see ``_tqdm_class``).

    tqdm.notebook imports without ipywidgets and fails only when a bar is drawn, and
    tqdm.auto falls back to text with a warning; both are checked here instead, so a
    notebook missing either hears at the call what to install.
    """
    try:
        importlib.import_module("ipywidgets")
        tqdm = importlib.import_module("tqdm.notebook").tqdm
    except ImportError as exc:
        raise ImportError(
            f"a progress bar in a notebook needs tqdm and ipywidgets; {exc.name or exc} is "
            "not installed: pip install 'corral[notebook]' (or pass progress=False)"
        ) from exc
    return _without_monitor(tqdm)


def _without_monitor(tqdm: type) -> type:
    # monitor_interval is tqdm's class-level switch for its thread: off in a class of ours
    return type("CorralBar", (tqdm,), {"monitor_interval": 0})
