"""``corral.report(obj)``: a running task tells its caller something (progress, a partial
result) before it returns.

Each kind of worker says how a report travels by setting the reporter of the context the
task runs in: a process child writes a REPORT frame, a thread or local worker hands the
object to the queue in the event loop. The caller reads them with ``job.reports()``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

_reporter: contextvars.ContextVar[Callable[[Any], None]] = contextvars.ContextVar("corral_reporter")


def report(obj: Any) -> None:
    """Send obj to the caller of the running task, at once; it arrives before the task's
    result, in the order sent. In a process worker obj is pickled (``SerializationError``
    if it will not). Raises ``RuntimeError`` outside a task run by corral."""
    try:
        reporter = _reporter.get()
    except LookupError:
        raise RuntimeError("corral.report() was called outside a task run by corral") from None
    reporter(obj)


def set_reporter(reporter: Callable[[Any], None]) -> contextvars.Token[Callable[[Any], None]]:
    """Make reporter receive the reports of the tasks run in the current context."""
    return _reporter.set(reporter)
