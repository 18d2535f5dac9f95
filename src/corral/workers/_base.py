"""The contract between a queue and a worker of any kind.

A worker runs jobs that its host (a ``TaskQueue`` or a ``Pool``) hands it, and tells the host
what became of each through three callbacks. The host decides *which* job goes *where*; the
worker only runs what it is given, in the order given::

    host                                 worker
      start(host) ---------------------->  ready to take jobs when it returns
      send(job)   ---------------------->  job_started(worker, job)     it began (optional)
                                           job_done(worker, job, ...)   value or exception
                                           worker_lost(worker, ...)     it died; what it held
      stop() / kill() ------------------>  gone when they return

A new kind (threads, processes, a cluster) implements these few methods; everything else
(priorities, series, retries, replacement) is the host's.
"""

from __future__ import annotations

import abc
import enum
import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .._errors import CorralError
    from .._job import Job

_numbers = itertools.count(1)

# How long a cancelled job that is still running may take to stop (its ``finally`` blocks,
# closing connections) before its worker gives up on it: kills its process, or abandons
# its thread or coroutine. Long enough for a task's clean-up, short enough that the slot
# soon serves again. Every kind's ``cancel`` defaults to it.
CANCEL_GRACE = 1.0


class WorkerHost(Protocol):
    """The callbacks a worker makes. All are called in the event loop's thread."""

    def job_started(self, worker: Worker, job: Job[Any]) -> None:
        """Job began running. Optional: a process worker records the start in memory it
        shares with its child instead, and reports it only in ``worker_lost``."""

    def job_done(
        self, worker: Worker, job: Job[Any], value: Any, error: BaseException | None
    ) -> None:
        """Job finished: with value when error is None, else with error."""

    def job_items(self, worker: Worker, job: Job[Any], items: list[Any]) -> None:
        """The next items of job's stream (``iterate``), in order. The first batch frees
        the worker's slot: the stream goes on while the worker takes other jobs."""

    def job_report(self, worker: Worker, job: Job[Any], obj: Any) -> None:
        """The running job called ``corral.report(obj)``."""

    def worker_lost(
        self,
        worker: Worker,
        error: CorralError,
        unstarted: list[Job[Any]],
        started: list[Job[Any]],
    ) -> None:
        """The worker died. ``unstarted`` jobs never began (they may run elsewhere, in this
        order); ``started`` ones were running and are lost, ``error`` says how."""


class WorkerState(enum.Enum):
    """Life of a worker, as the queue's loop sees it (every kind goes the same way)."""

    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    DEAD = "dead"


def check_initializer(initializer: object) -> None:
    """An initializer is a callable or None; said at the call that gave it."""
    if initializer is not None and not callable(initializer):
        raise TypeError(f"initializer must be callable, not {initializer!r}")


class Worker(abc.ABC):
    """One worker: a process, a thread, the event loop itself or a remote machine.

    ``series`` names the series of jobs it serves; None serves every series. ``name`` is
    what errors and stats call it.
    """

    kind = "worker"

    def __init__(self, *, series: Iterable[str] | None = None, name: str | None = None) -> None:
        if isinstance(series, str):
            raise TypeError(
                f"series must be a list of names, not the string {series!r}: "
                f"write series=[{series!r}]"
            )
        self.series: frozenset[str] | None = None if series is None else frozenset(series)
        self._name = name
        self.state = WorkerState.NEW
        self.tasks_sent = 0  # jobs handed to it
        self.tasks_done = 0  # jobs it finished
        self.busy_time = 0.0  # seconds spent running jobs (the host adds each run time)
        self.ready_at: float | None = None  # perf_counter when it began serving its host

    @property
    def name(self) -> str:
        """What errors and stats call this worker (numbered when first asked for)."""
        if self._name is None:
            self._name = f"{self.kind}-{next(_numbers)}"
        return self._name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def serves(self, series: str | None) -> bool:
        """Whether jobs of series may go to this worker (jobs of no series go anywhere)."""
        return series is None or self.series is None or series in self.series

    @abc.abstractmethod
    async def start(self, host: WorkerHost) -> None:
        """Start serving host. When it returns the worker is ready for ``send``.

        Raises ``WorkerStartupError`` when the worker could not start; it then holds no
        resources.
        """

    @abc.abstractmethod
    def send(self, job: Job[Any]) -> None:
        """Hand job over; never blocks. The outcome comes back through the host's callbacks.

        Jobs run in the order sent. Before ``job_done`` the worker sets ``job.run_time``
        to the seconds spent inside the call (stats split it from transfer time).
        """

    def credit(self, job: Job[Any], n: int) -> None:
        """The consumer of job's stream took n items, so the worker may produce n more.
        A job is a stream when ``job.stream`` is set: the worker iterates what the call
        returns, sends items through ``job_items`` no further ahead than its credit (the
        first ``job.stream.window`` items are granted), and ends it through ``job_done``.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot stream (iterate)")

    @abc.abstractmethod
    def cancel(self, job: Job[Any], *, grace: float = CANCEL_GRACE) -> None:
        """Stop job, which was sent to this worker; its outcome no longer matters.

        A job not started never starts. A running one is interrupted and given grace
        seconds to stop; if it does not, or grace is 0, the worker is ended to stop it and
        reports ``worker_lost``. Either way the job's slot is freed through ``job_done``
        or ``worker_lost``.
        """

    @abc.abstractmethod
    async def stop(self) -> None:
        """Finish the jobs already sent, then stop. When it returns, nothing of it is left."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Stop now, abandoning what it holds. When it returns, nothing of it is left
        (a process is reaped, its fds closed); jobs it held are reported as lost."""

    @property
    def alive(self) -> bool:
        """Whether the worker has started and not yet stopped or died."""
        return self.state in (WorkerState.STARTING, WorkerState.READY, WorkerState.STOPPING)

    @property
    def pid(self) -> int | None:
        """The worker's process id, where it has its own process."""
        return None

    def rss(self) -> int | None:
        """Resident memory of the worker's own process in bytes; None where it has none
        (or it is gone)."""
        return None

    def may_have_started(self, job: Job[Any]) -> bool:
        """Whether job, sent to this worker, may have begun. A worker that keeps jobs
        queued ahead and knows which it began says False for the others, so that they can
        be withdrawn (cancelled without interrupting anything); the default is True."""
        return True
