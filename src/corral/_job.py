"""``Job``: the handle of one submitted call, its states and its cancellation.

A job is awaitable. Awaiting it gives the call's value or raises its exception; awaiting a
cancelled job raises ``asyncio.CancelledError``. Cancelling the asyncio task that awaits a job
cancels the job, as cancelling a task cancels the future it awaits.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from ._stream import ItemStream, Reports
from ._wire import dumps_call

if TYPE_CHECKING:
    from ._wire import Encoded

T = TypeVar("T")


class JobState(enum.Enum):
    """Where a job is in its life."""

    PENDING = "pending"  # queued, not yet handed to a worker
    SENT = "sent"  # handed to a worker that has not acknowledged it
    RUNNING = "running"  # acknowledged: the worker is running it
    DONE = "done"  # finished with a value or an exception
    CANCELLED = "cancelled"

    successors: tuple[JobState, ...]  # the states it may go to (see ``move``)


# Where a job may go from each state. Only the queue moves a job (workers report what
# happened; the queue decides what it means), through ``move``, which refuses any other
# step: one would be a bug in corral, and is better loud than a job stuck or run twice.
# Kept on each state as a tuple: a lookup by identity, where a dict or a set of states
# would hash the enum in Python several times per call.
_NEXT: dict[JobState, tuple[JobState, ...]] = {
    JobState.PENDING: (JobState.SENT, JobState.DONE, JobState.CANCELLED),
    JobState.SENT: (JobState.RUNNING, JobState.PENDING, JobState.DONE, JobState.CANCELLED),
    JobState.RUNNING: (JobState.PENDING, JobState.DONE, JobState.CANCELLED),
    JobState.DONE: (),
    JobState.CANCELLED: (),
}
for _state, _successors in _NEXT.items():
    _state.successors = _successors


def move(job: Job[Any], state: JobState) -> None:
    """Move job to state; ``RuntimeError`` for a step its life cycle does not have."""
    if state not in job.state.successors:
        raise RuntimeError(f"{job!r} cannot go from {job.state.value} to {state.value}")
    job.state = state


class JobOwner(Protocol):
    """What a job needs from the queue that holds it."""

    def cancel_job(self, job: Job[Any]) -> None:
        """Withdraw job: drop it if pending, stop it if running."""


class JobFuture(asyncio.Future[T]):
    """The future of a job: cancelling it withdraws the job, before it returns.

    asyncio cancels the future a task awaits by calling its ``cancel`` method, so a
    cancelled caller withdraws its job at once, and no done-callback per job is needed to
    notice (settling a job is the hot path: this saves a scheduled callback per call).
    """

    __slots__ = ("job",)

    def __init__(self, *, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.job: Job[T] | None = None

    def cancel(self, msg: Any = None) -> bool:
        job = self.job
        if job is not None and not self.done():
            self.job = None
            job._withdraw()
        return super().cancel(msg)


class Job(Generic[T]):
    """One call on its way through the queue: awaitable, cancellable, inspectable."""

    __slots__ = (
        "__weakref__",
        "_owner",
        "_reports",
        "args",
        "deliveries",
        "fn",
        "future",
        "id",
        "payload",
        "priority",
        "retries",
        "run_time",
        "sent_at",
        "series",
        "soft_time_limit",
        "state",
        "stream",
        "submitted_at",
        "time_limit",
        "worker",
    )

    _owner: JobOwner
    id: int
    fn: Callable[..., T]
    args: tuple[Any, ...]
    future: JobFuture[T]
    priority: float
    series: str | None
    retries: int
    time_limit: float | None
    soft_time_limit: float | None
    state: JobState
    payload: Encoded | None  # the pickled call, for process workers
    deliveries: int  # times a worker died holding it before acknowledging it
    worker: Any  # a job pinned to one worker (a broadcast) runs only there
    # Timings for stats, on the perf_counter clock: the queue stamps submission and
    # hand-over; the worker sets run_time (seconds inside fn) before ``job_done``.
    submitted_at: float
    sent_at: float
    run_time: float | None
    stream: ItemStream | None  # set for ``iterate``: the items in transit
    _reports: Reports | None

    def __init__(self) -> None:
        raise TypeError("a Job is made by a queue's submit(), not by hand")

    def encode(self) -> Encoded:
        """The pickled call, made once (a requeued job is not pickled again); raises
        ``SerializationError`` naming what would not pickle."""
        if self.payload is None:
            self.payload = dumps_call(
                self.fn,
                self.args,
                soft_time_limit=self.soft_time_limit,
                ack=self.time_limit is not None,  # a hard limit counts from the ACK
                credit=0 if self.stream is None else self.stream.window,
            )
        return self.payload

    def __await__(self) -> Generator[Any, None, T]:
        return self.future.__await__()

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", type(self.fn).__qualname__)
        return f"<Job {self.id} {name} {self.state.value}>"

    def done(self) -> bool:
        """Whether the job finished, failed or was cancelled."""
        return self.future.done()

    def cancelled(self) -> bool:
        """Whether the job was cancelled."""
        return self.future.cancelled()

    def cancel(self, msg: Any = None) -> bool:
        """Cancel the job: a pending job never runs, a running one is stopped in its worker.

        Returns False when the job was already done, True otherwise.
        """
        return self.future.cancel(msg)  # which withdraws the job first

    def result(self) -> T:
        """The value of a finished job; raises its exception, or ``InvalidStateError``."""
        return self.future.result()

    def exception(self) -> BaseException | None:
        """The exception of a finished job, or None."""
        return self.future.exception()

    def reports(self) -> AsyncIterator[Any]:
        """The objects the task sends with ``corral.report(obj)``, in order; the iteration
        ends once the job is done (reports come before the result). Those sent before
        this was called are kept for it."""
        return self._report_buffer().read(self.future.done)

    def on_report(self, fn: Callable[[Any], object]) -> None:
        """Call fn(obj) for each report from now on, in the event loop, as it arrives."""
        self._report_buffer().callbacks.append(fn)

    def _report_buffer(self) -> Reports:
        if self._reports is None:
            reports = self._reports = Reports()
            self.future.add_done_callback(lambda _: reports.wake())  # the reading ends
        return self._reports

    def add_done_callback(
        self, fn: Callable[[Job[T]], object], *, context: contextvars.Context | None = None
    ) -> None:
        """Call fn(job) once the job is done (in the event loop), as a future does."""
        self.future.add_done_callback(_Relay(fn, self), context=context)

    def remove_done_callback(self, fn: Callable[[Job[T]], object]) -> int:
        """Withdraw fn added by ``add_done_callback``; returns how many were withdrawn."""
        return self.future.remove_done_callback(fn)  # type: ignore[arg-type]  # a _Relay of fn equals fn

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the job's future belongs to (its queue's)."""
        return self.future.get_loop()

    # A job is a future to asyncio (``asyncio.isfuture``): ``gather``, ``wait``, ``shield``
    # and ``wait_for`` take it as it is, instead of wrapping each job in a task of its own
    # (a task per job was a tenth of the parent's time for a gather of many jobs).
    _asyncio_future_blocking = False

    def _make_cancelled_error(self) -> asyncio.CancelledError:
        """The CancelledError a cancelled job raises (asyncio's future protocol: gather)."""
        try:
            self.future.result()
        except asyncio.CancelledError as exc:
            return exc
        raise asyncio.InvalidStateError(f"{self!r} was not cancelled")

    def _withdraw(self) -> None:
        if self.state.successors:  # neither done nor cancelled
            move(self, JobState.CANCELLED)
            self._owner.cancel_job(self)

    def _finish(self) -> None:
        """Let go of what only a running job needs (the job and its future refer to each
        other, and a large pickled payload should not wait for the cycle collector)."""
        move(self, JobState.DONE)
        self.future.job = None
        self.payload = None


class JobCoroutine(Job[T], Coroutine[Any, Any, T]):
    """The job ``run`` returns: a ``Job`` that asyncio also takes as a coroutine, so that
    ``pool.run(...)`` goes wherever a coroutine went (``create_task``, a ``TaskGroup``),
    while ``gather`` and ``wait_for`` take it as the future it is (no task per call). Like
    a coroutine, and unlike a job of ``submit``, ``asyncio.wait`` refuses it."""

    __slots__ = ("_driver",)

    _driver: Generator[Any, None, T] | None  # what a task made of the job steps

    def send(self, value: Any) -> Any:
        driver = self._driver
        if driver is None:
            driver = self._driver = self.future.__await__()
        return driver.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        driver = self._driver
        if driver is None:
            driver = self._driver = self.future.__await__()
        if val is None and tb is None:
            return driver.throw(typ)
        return driver.throw(typ, val, tb)  # the old three-argument form

    def close(self) -> None:
        if self._driver is not None:
            self._driver.close()


class _Relay:
    """A job's done-callback: calls fn with the job (not its future), and equals fn, so
    that ``remove_done_callback(fn)`` finds it."""

    __slots__ = ("fn", "job")

    def __init__(self, fn: Callable[[Any], object], job: Job[Any]) -> None:
        self.fn = fn
        self.job = job

    def __call__(self, _: object) -> None:
        self.fn(self.job)

    def __eq__(self, other: object) -> bool:
        return other is self or other == self.fn

    __hash__ = None  # type: ignore[assignment]


def new_job(
    owner: JobOwner,
    job_id: int,
    fn: Callable[..., T],
    args: tuple[Any, ...],
    loop: asyncio.AbstractEventLoop,
    *,
    priority: float = 0,
    series: str | None = None,
    retries: int = 0,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    kind: type[Job[Any]] = Job,
) -> Job[T]:
    """A new PENDING job of owner's (the queue's): the one way a job is made, so the public
    ``Job`` is the handle only. kind: ``Job``, or ``JobCoroutine`` for ``run``."""
    job: Job[T] = object.__new__(kind)
    job._owner = owner
    job.id = job_id
    job.fn = fn
    job.args = args
    job.future = JobFuture(loop=loop)
    job.future.job = job
    job.priority = priority
    job.series = series
    job.retries = retries
    job.time_limit = time_limit
    job.soft_time_limit = soft_time_limit
    job.state = JobState.PENDING
    job.payload = None
    job.deliveries = 0
    job.worker = None
    job.submitted_at = 0.0
    job.sent_at = 0.0
    job.run_time = None
    job.stream = None
    job._reports = None
    if kind is JobCoroutine:
        job._driver = None  # type: ignore[attr-defined]
    return job


def settle(job: Job[T], value: T | None, error: BaseException | None) -> None:
    """End job with its value or error (a cancelled job stays cancelled). The queue's one
    way to finish a job (a second end, a result after a time limit's, is dropped)."""
    if not job.state.successors:  # done or cancelled already
        return
    job._finish()
    future = job.future
    if future.done():
        return
    if error is None:
        future.set_result(value)  # type: ignore[arg-type]
    else:
        future.set_exception(error)


def take_retry(job: Job[Any]) -> bool:
    """Whether job, whose worker was lost while it ran, runs again (spending one of its
    retries): while it has retries left, unless it was a broadcast (pinned to the worker
    that is gone) or a stream whose items have begun to arrive (they cannot be taken back).
    """
    if job.retries <= 0 or job.worker is not None:
        return False
    if job.stream is not None and job.stream.released:
        return False
    job.retries -= 1
    return True


def add_report(job: Job[Any], obj: Any) -> None:
    """The running job called ``corral.report(obj)``: keep it for its readers."""
    if not job.done():
        job._report_buffer().add(obj)
