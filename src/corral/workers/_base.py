"""The contract between a queue and a worker of any kind.

A worker runs jobs that its host (a ``TaskQueue`` or a ``Pool``) hands it, and tells the host
what became of each through the host's callbacks. The host decides *which* job goes *where*
and *what it means*; the worker only runs what it is given and reports:

    host                                 worker
      start(host) ---------------------->  ready to take jobs when it returns
      send(job)   ---------------------->  job_started(worker, job)     it began
      credit(job, n)  (a stream) ------->  job_report / job_items        while it runs
      cancel(job, grace=) -------------->  job_done(worker, job, ...)   value or exception
                                           worker_lost(worker, ...)     it died; what it held
      stop() / kill() ------------------>  gone when they return

What every worker must do:

- Account for every job it is sent exactly once: through ``job_done``, or in the
  ``unstarted`` or ``started`` list of its one ``worker_lost``; then say no more of it.
  A job it reports ``unstarted`` has surely not begun (the host runs it elsewhere: never
  twice); one that may have begun is ``started``.
- Call the host in the event loop's thread only.
- Report ``job_started`` before the call begins for every job with a hard time limit
  (``job.time_limit``: the host times it from there); for others it may leave it out.
  Reports and stream items come in order, before the job's ``job_done``.
- Set ``job.run_time`` (seconds inside the call) before ``job_done`` where it can measure
  it, else leave it None. A worker that can tell a job was delivered whole and killed it
  before it began adds one to ``job.deliveries`` (the host fails such a job at its bound
  instead of retrying it for ever). It counts nothing: its host keeps its figures.

What it must not do: write ``job.state`` (the queue moves every job through its life
cycle), choose among jobs (order, priority, series, retries and replacement are the
host's), or report a job twice.

Where a kind cannot do something the contract asks (a thread cannot be interrupted in a C
call; Dask cannot interrupt a running thread at all), its module says so and what it
does instead. ``tests/test_worker_contract.py`` runs one suite over every kind and names
each such gap; ``tests/fakes.py`` is a worker that keeps this contract and does nothing
else, which the queue's own tests drive.
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
        """Job began running. Required for a job with a hard time limit, whose clock
        starts here; optional for others (a process worker records their start in memory
        it shares with its child, and reports it only in ``worker_lost``)."""

    def job_done(
        self, worker: Worker, job: Job[Any], value: Any, error: BaseException | None
    ) -> None:
        """Job finished: with value when error is None, else with error (the call's own
        exception; ``CancelledError`` for a job cancelled before or while it ran). The
        job's slot in the worker is free again."""

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
        """The worker died (or was killed while it held jobs; once, and never while it
        starts: ``start`` raises instead). ``unstarted`` jobs surely never began (they may
        run elsewhere, in this order, the order sent); ``started`` ones may have begun and
        are lost, open streams included; ``error`` says how."""


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

    ``series`` names the series of jobs it serves; None serves every series (a string is
    refused: it would be a set of letters). ``name`` is what errors and stats call it.
    ``state`` is the worker's own life cycle; its figures (``tasks_sent``, ``tasks_done``,
    ``busy_time``, ``ready_at``) are written by its host. See the module docstring for
    what every kind must do.
    """

    kind = "worker"

    def __init__(self, *, series: Iterable[str] | None = None, name: str | None = None) -> None:
        self.state = WorkerState.NEW  # first: a worker refused here is still one to collect
        if isinstance(series, str):
            raise TypeError(
                f"series must be a list of names, not the string {series!r}: "
                f"write series=[{series!r}]"
            )
        self.series: frozenset[str] | None = None if series is None else frozenset(series)
        self._name = name
        # Its figures, which its host keeps (the worker only reports): stats and logs read them.
        self.tasks_sent = 0  # jobs handed to it
        self.tasks_done = 0  # jobs it finished
        self.busy_time = 0.0  # seconds spent running jobs
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

        Raises ``WorkerStartupError`` when the worker could not start (an initializer's
        exception is its cause); it then holds no resources and is dead. A worker starts
        once: ``RuntimeError`` the second time.
        """

    @abc.abstractmethod
    def send(self, job: Job[Any]) -> None:
        """Hand job over; never blocks. The outcome comes back through the host's callbacks.

        A worker that runs one job at a time runs them in the order sent; one that runs
        several at once (a cluster) holds as many as the host sends it, and the host's
        strategy bounds that. Raises ``RuntimeError`` unless the worker is ready, and may
        raise ``SerializationError`` for a call that cannot travel: then it holds nothing
        of the job, which the host fails. Before ``job_done`` the worker sets
        ``job.run_time`` to the seconds spent inside the call where it can measure them
        (stats split it from transfer time).
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

        A job not started never starts: it ends through ``job_done`` with
        ``CancelledError`` (at once where the worker holds it itself; a process worker's
        child skips it when it comes to it). A running one is interrupted
        (``CancelledError`` raised inside it) and given grace seconds to stop; if it does
        not, or grace is 0, the worker ends itself to stop it and reports
        ``worker_lost``, the job as started. Either way the job's slot is freed through
        ``job_done`` or ``worker_lost``. A job the worker no longer holds is ignored.
        """

    @abc.abstractmethod
    async def stop(self) -> None:
        """Finish the jobs already sent, then stop. When it returns, nothing of it is left
        (no thread, no process, no fd). An open stream is closed (its ``finally`` runs)
        and reported in ``worker_lost`` as started; with none, no loss is reported.
        Idempotent; returns at once for a worker never started or already dead."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Stop now, abandoning what it holds. When it returns, nothing of it is left
        (a process is reaped, its fds closed; a thread busy in a call may finish it, its
        outcome ignored). Jobs it held are reported in ``worker_lost``, the running ones
        as started and the rest as unstarted in order; an idle worker reports nothing.
        Returns at once for a worker never started or already dead."""

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
        """Whether job, sent to this worker, may have begun: never False for a job that
        has. A worker that keeps jobs queued ahead and knows which it began says False for
        the others, so that they can be withdrawn (cancelled without interrupting
        anything), and reports them unstarted if it dies; the default is True. A dead
        worker still answers, without raising."""
        return True
