"""What corral logs: the events an operator must know, under the logger ``corral``.

One function per event, called where the event is decided (the queue, a worker), never
per call: a successful call logs nothing, and each function returns at once unless the
logger is enabled for its level, before building a message or a fact.

Each record carries its facts as attributes named ``corral_<fact>`` (``extra``), so a
handler can route them to metrics without parsing messages: ``corral_event`` names the
event (the constants below), ``corral_worker`` the worker, ``corral_pid`` its process,
and so on (docs/logging.md has the table). No attribute of ``logging.LogRecord`` starts
with ``corral_``, so the facts never clash with the record's own.

The ``corral`` logger gets a ``NullHandler`` here, its only handler: a program that has
not configured logging hears nothing (Python's last-resort handler would print warnings to
stderr), and one that has gets the records through its own handlers. It is attached when
the first module that logs loads, not by ``import corral``, which loads no ``logging``
(every worker process imports corral); no record can be made before then.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING, Any

from ._wire import describe

if TYPE_CHECKING:
    from ._errors import CorralError, WorkerStartupError
    from ._job import Job
    from .workers._base import Worker

logger = logging.getLogger("corral")
logger.addHandler(logging.NullHandler())

# The events, as ``record.corral_event``.
WORKER_LOST = "worker_lost"  # WARNING: a worker died, or was ended, holding jobs
KILLED_AT_TIME_LIMIT = "killed_at_time_limit"  # WARNING: a job ran past its hard limit
KILLED_AFTER_CANCEL = "killed_after_cancel"  # WARNING: a job ignored its cancel past grace
WORKER_RECYCLED = "worker_recycled"  # INFO: a worker retires at its quota or memory limit
START_FAILED = "start_failed"  # WARNING: a worker could not start; the retry, if any
GAVE_UP = "gave_up"  # ERROR: workers cannot start; calls fail from now on
REPLAY_FAILED = "replay_failed"  # WARNING: a broadcast raised, replayed on a new worker
WORKER_STARTED = "worker_started"  # DEBUG: a worker serves
WORKER_STOPPED = "worker_stopped"  # DEBUG: a worker that served was stopped or killed

EVENTS = (
    WORKER_LOST,
    KILLED_AT_TIME_LIMIT,
    KILLED_AFTER_CANCEL,
    WORKER_RECYCLED,
    START_FAILED,
    GAVE_UP,
    REPLAY_FAILED,
    WORKER_STARTED,
    WORKER_STOPPED,
)


def worker_lost(
    worker: Worker, error: CorralError, started: list[Job[Any]], unstarted: list[Job[Any]]
) -> None:
    """worker died (or was ended at a limit) holding started and unstarted jobs."""
    if not logger.isEnabledFor(logging.WARNING):
        return
    job = started[0] if started else None
    exitcode = getattr(error, "exitcode", None)
    number = getattr(error, "signal", None)
    held = f" running job {job.id} ({_function(job)})" if job else ""
    if unstarted:
        held += f" with {_jobs(len(unstarted))} not yet begun"
    message = f"lost worker {_who(worker)}{held}: {error}"
    _emit(
        logging.WARNING,
        WORKER_LOST,
        message,
        **_worker(worker),
        exitcode=exitcode,
        signal=number,
        signal_name=_signal_name(number),
        **_job(job),
        started=len(started),
        unstarted=len(unstarted),
    )


def killed_at_time_limit(worker: Worker, job: Job[Any], limit: float) -> None:
    """job ran past its hard time limit: its worker is ended (a process killed)."""
    if not logger.isEnabledFor(logging.WARNING):
        return
    message = (
        f"job {job.id} ({_function(job)}) ran past its hard time limit of {limit:g} s; "
        f"ending worker {_who(worker)}"
    )
    _emit(
        logging.WARNING,
        KILLED_AT_TIME_LIMIT,
        message,
        **_worker(worker),
        **_job(job),
        time_limit=limit,
    )


def killed_after_cancel(worker: Worker, job: Job[Any], grace: float, how: str) -> None:
    """job, cancelled, still ran grace seconds later: worker ends (how: what happens)."""
    if not logger.isEnabledFor(logging.WARNING):
        return
    message = (
        f"job {job.id} ({_function(job)}) still ran {grace:g} s after it was cancelled; "
        f"worker {_who(worker)}: {how}"
    )
    _emit(
        logging.WARNING,
        KILLED_AFTER_CANCEL,
        message,
        **_worker(worker),
        **_job(job),
        grace=grace,
    )


def worker_recycled(worker: Worker, reason: str, limit: int, rss: int | None = None) -> None:
    """worker retires at the limit of option reason (rss: its memory, if that was it)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    if rss is None:
        why = f"it reached {reason}={limit}"
    else:
        why = f"its memory, {rss / 2**20:.1f} MiB, is above {reason} ({limit / 2**20:.1f} MiB)"
    message = f"recycling worker {_who(worker)}: {why}; it stops once its jobs are done"
    _emit(
        logging.INFO,
        WORKER_RECYCLED,
        message,
        **_worker(worker),
        reason=reason,
        limit=limit,
        tasks=worker.tasks_sent,
        rss=rss,
    )


def start_failed(
    worker: Worker, error: CorralError, *, failures: int, retry_in: float | None
) -> None:
    """worker could not start; the queue retries after retry_in seconds (None: it does
    not: the worker was the caller's own); failures: failed starts in a row, counted."""
    if not logger.isEnabledFor(logging.WARNING):
        return
    cause = error.__cause__
    exitcode = getattr(cause, "exitcode", None)
    number = getattr(cause, "signal", None)
    if retry_in is None:
        then = "it is not retried"
    elif retry_in:
        then = f"retrying in {retry_in:g} s"
    else:
        then = "retrying at once"
    message = f"worker {_who(worker)} failed to start: {error}; {then}"
    _emit(
        logging.WARNING,
        START_FAILED,
        message,
        **_worker(worker),
        error=str(error),
        exitcode=exitcode,
        signal=number,
        signal_name=_signal_name(number),
        failures=failures,
        retry_in=retry_in,
    )


def gave_up(error: WorkerStartupError) -> None:
    """No worker will start: the queue is broken, and its calls fail with error."""
    if not logger.isEnabledFor(logging.ERROR):
        return
    message = f"giving up starting workers: {error}; calls fail with WorkerStartupError"
    _emit(logging.ERROR, GAVE_UP, message, error=str(error), attempts=error.attempts)


def replay_failed(worker: Worker, fn: Any, error: BaseException) -> None:
    """A broadcast, replayed on a new worker before it serves, raised error."""
    if not logger.isEnabledFor(logging.WARNING):
        return
    raised = f"{type(error).__name__}: {error}"
    message = f"broadcast {describe(fn)}, replayed on worker {_who(worker)}, raised {raised}"
    _emit(
        logging.WARNING,
        REPLAY_FAILED,
        message,
        **_worker(worker),
        function=describe(fn),
        error=raised,
    )


def worker_started(worker: Worker) -> None:
    """worker has started (and replayed the broadcasts): it takes jobs."""
    if logger.isEnabledFor(logging.DEBUG):
        message = f"worker {_who(worker)} started"
        _emit(logging.DEBUG, WORKER_STARTED, message, **_worker(worker))


def worker_stopped(worker: Worker, *, killed: bool) -> None:
    """worker, which served, was stopped (or killed) by its queue, and is gone."""
    if logger.isEnabledFor(logging.DEBUG):
        how = "was killed" if killed else "stopped"
        message = f"worker {_who(worker)} {how} after {_jobs(worker.tasks_done)}"
        facts = {**_worker(worker), "killed": killed, "tasks": worker.tasks_done}
        _emit(logging.DEBUG, WORKER_STOPPED, message, **facts)


def _emit(level: int, event: str, message: str, **facts: Any) -> None:
    extra = {"corral_event": event}
    extra.update((f"corral_{name}", value) for name, value in facts.items())
    # stacklevel 3: the record names the line that decided the event, not this module.
    logger.log(level, message, extra=extra, stacklevel=3)


def _worker(worker: Worker) -> dict[str, Any]:
    """The facts every record about a worker carries."""
    return {"worker": worker.name, "kind": worker.kind, "pid": worker.pid}


def _job(job: Job[Any] | None) -> dict[str, Any]:
    if job is None:
        return {"job": None, "function": None}
    return {"job": job.id, "function": _function(job)}


def _who(worker: Worker) -> str:
    pid = worker.pid
    return worker.name if pid is None else f"{worker.name} (pid {pid})"


def _jobs(n: int) -> str:
    return "1 job" if n == 1 else f"{n} jobs"


def _function(job: Job[Any]) -> str:
    """The job's function by name; a chunk of ``map`` runs one of corral's over the
    user's function, its first argument, which is named too: ``call_each(square, ...)``."""
    fn, args = job.fn, job.args
    module = getattr(fn, "__module__", None) or ""
    if module.partition(".")[0] == "corral" and args and callable(args[0]):
        return f"{describe(fn)}({describe(args[0])}, ...)"
    return describe(fn)


def _signal_name(number: int | None) -> str | None:
    if number is None:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return None
