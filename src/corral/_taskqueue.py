"""``TaskQueue``: calls in, workers of any kind out.

The queue takes calls (``submit``, ``run``, ``map``), keeps them in the ``Dispatcher``'s order,
hands them to attached workers and settles each job from the workers' callbacks. What to do
when a worker dies (requeue what it had not started, fail or retry what it had) is decided
here, once, for every kind of worker. ``Pool`` adds keeping process workers alive.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import itertools
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, TypeVarTuple, Unpack

from ._child import call_each
from ._errors import CorralError, PoolClosedError, TimeLimitExceeded, WorkerLostError
from ._job import Job, JobState
from ._queue import Dispatcher

if TYPE_CHECKING:
    from .workers._base import Worker

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# A job whose delivery killed this many workers before any acknowledged it is failed: the
# culprit is the job itself (an argument whose unpickling kills the process), and retrying
# it forever would kill workers forever.
MAX_DELIVERIES = 3

# map() cuts its input into about this many chunks per worker: enough for the workers to
# balance uneven chunks, few enough that per-job overhead vanishes for tiny calls.
CHUNKS_PER_WORKER = 4

Strategy = Literal["fair", "prefetch"]


class QueueState(enum.Enum):
    """Life of a queue."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class TaskQueue:
    """A priority queue of calls served by the workers attached to it.

    Args:
        strategy: ``"fair"`` hands a job only to an idle worker; ``"prefetch"`` keeps up to
            ``prefetch`` jobs in flight per worker, which saves a round trip per job when
            jobs are short and similar.
        prefetch: jobs in flight per worker under ``"prefetch"``.
    """

    def __init__(self, *, strategy: Strategy = "fair", prefetch: int = 4) -> None:
        if strategy not in ("fair", "prefetch"):
            raise ValueError(f"strategy must be 'fair' or 'prefetch', not {strategy!r}")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be a positive int, not {prefetch!r}")
        self.strategy = strategy
        self.prefetch = prefetch
        self._capacity = 1 if strategy == "fair" else prefetch
        self._dispatcher: Dispatcher[Worker, Job[Any]] = Dispatcher()
        self._in_flight: dict[Job[Any], Worker] = {}
        self._deadlines: dict[Job[Any], asyncio.TimerHandle] = {}  # hard time limits
        self._retiring: set[Worker] = set()  # taking no new jobs; stopped once idle
        self._workers: dict[Worker, None] = {}  # attached and started
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = QueueState.OPEN
        self._drained: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._broken: BaseException | None = None  # set when no worker can ever serve

    # -- life cycle -----------------------------------------------------------------------

    async def __aenter__(self) -> TaskQueue:
        self._bind_loop()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        """Close on a normal exit. Leaving on an error cancels the jobs not yet started and
        waits for the running ones; leaving because the task was cancelled (or Ctrl-C)
        terminates, cancelling every unfinished job."""
        if exc_type is None:
            await self.close()
        elif issubclass(exc_type, asyncio.CancelledError | KeyboardInterrupt):
            await self.terminate()
        else:
            for job in self._dispatcher.drain():
                job.cancel()
            await self.close()

    @property
    def closed(self) -> bool:
        """Whether the queue refuses new calls."""
        return self._state is not QueueState.OPEN

    @property
    def workers(self) -> list[Worker]:
        """The workers serving now."""
        return list(self._workers)

    def attach(self, worker: Worker) -> asyncio.Task[None]:
        """Start worker and let it serve this queue; returns the task that starts it."""
        self._check_open("attach a worker")
        return self._spawn_task(self._start_worker(worker))

    async def detach(self, worker: Worker) -> None:
        """Stop giving jobs to worker, let it finish what it holds, then stop it."""
        if worker not in self._workers:
            raise ValueError(f"{worker!r} is not attached to this queue")
        self._dispatcher.remove_worker(worker)
        del self._workers[worker]
        await worker.stop()

    async def close(self) -> None:
        """Run every queued and running job to its end, then stop the workers. Idempotent."""
        if self._state is QueueState.CLOSED:
            return
        self._state = QueueState.CLOSING
        await self._wait_drained()
        self._state = QueueState.CLOSED
        await self._stop_workers(kill=False)

    async def terminate(self) -> None:
        """Kill the workers now; every unfinished job is cancelled. Idempotent."""
        self._state = QueueState.CLOSED
        for job in [*self._dispatcher.drain(), *self._in_flight]:
            job.state = JobState.CANCELLED  # the workers die anyway: no need to stop it
            job.future.cancel()
        self._in_flight.clear()
        for deadline in self._deadlines.values():
            deadline.cancel()
        self._deadlines.clear()
        if self._drained is not None:
            self._drained.set()  # a close() waiting for these jobs returns
        for task in list(self._tasks):
            task.cancel()
        await self._stop_workers(kill=True)

    async def _stop_workers(self, *, kill: bool) -> None:
        workers = list(self._workers)
        self._workers.clear()
        for worker in workers:
            self._dispatcher.remove_worker(worker)
        await asyncio.gather(*(w.kill() if kill else w.stop() for w in workers))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _wait_drained(self) -> None:
        # One event for every caller of close(), never replaced; each waiter re-checks the
        # queue after a wake (a dead worker's jobs are requeued before the event is set).
        if self._drained is None:
            self._drained = asyncio.Event()
        while (self._dispatcher or self._in_flight) and self._state is not QueueState.CLOSED:
            if self._broken is not None:
                self._fail_pending(self._broken)
                continue
            await self._drained.wait()
            self._drained.clear()

    def _check_drained(self) -> None:
        if self._drained is not None and not (self._dispatcher or self._in_flight):
            self._drained.set()

    # -- calls ----------------------------------------------------------------------------

    def submit(
        self,
        fn: Callable[[Unpack[Ts]], T],
        /,
        *args: *Ts,
        priority: float = 0,
        series: str | None = None,
        retries: int = 0,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
    ) -> Job[T]:
        """Queue fn(*args) and return its ``Job`` at once (awaitable, cancellable).

        Keyword arguments of fn go through ``functools.partial``. Lower ``priority`` runs
        sooner; ``series`` restricts the job to workers serving it; ``retries`` reruns a job
        whose worker died while running it.
        """
        if self._broken is not None:  # more telling than "closed": why it cannot serve
            raise self._broken_error()
        if self._state is not QueueState.OPEN:
            raise PoolClosedError("submit", self._state.value)
        if not callable(fn):
            raise TypeError(f"the function to run must be callable, not {fn!r}")
        if series is not None and self._workers and not self._dispatcher.serves(series):
            raise ValueError(
                f"no worker serves series={series!r}; attach one with series=[{series!r}]"
            )
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, not {retries!r}")
        check_limit("time_limit", time_limit)
        check_limit("soft_time_limit", soft_time_limit)
        loop = self._loop or self._bind_loop()
        job: Job[T] = Job(
            self,
            next(self._ids),
            fn,
            args,
            loop,
            priority=priority,
            series=series,
            retries=retries,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
        )
        self._admit(job)
        self._dispatch(self._dispatcher.push(job))
        return job

    async def run(
        self,
        fn: Callable[[Unpack[Ts]], T],
        /,
        *args: *Ts,
        priority: float = 0,
        series: str | None = None,
        retries: int = 0,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
    ) -> T:
        """Run fn(*args) in a worker and return its value (or raise its exception)."""
        job = self.submit(
            fn,
            *args,
            priority=priority,
            series=series,
            retries=retries,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
        )
        return await job

    async def map(
        self,
        fn: Callable[[Any], T],
        iterable: Iterable[Any],
        /,
        *,
        chunksize: int | None = None,
        priority: float = 0,
        series: str | None = None,
        retries: int = 0,
    ) -> list[T]:
        """Return ``[fn(x) for x in iterable]`` computed by the workers, in input order.

        Small calls are grouped into chunks (one job each) so their overhead is shared;
        ``chunksize`` overrides the automatic size. The first exception raised by a call is
        raised here and the rest of the map is cancelled.
        """
        if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be a positive int, not {chunksize!r}")
        items = list(iterable)
        if not items:
            return []
        size = chunksize or self._auto_chunksize(len(items))
        options: dict[str, Any] = {"priority": priority, "series": series, "retries": retries}
        jobs: list[Job[Any]]
        if size == 1:
            jobs = [self.submit(fn, x, **options) for x in items]
        else:
            jobs = [
                self.submit(call_each, fn, items[i : i + size], **options)
                for i in range(0, len(items), size)
            ]
        try:
            parts = await asyncio.gather(*(job.future for job in jobs))
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        if size == 1:
            return parts
        return [value for part in parts for value in part]

    def _auto_chunksize(self, n: int) -> int:
        workers = max(1, len(self._workers) or self._expected_workers())
        return max(1, math.ceil(n / (workers * CHUNKS_PER_WORKER)))

    def _expected_workers(self) -> int:
        """How many workers the queue will have; a pool knows before they are up."""
        return len(self._workers)

    def _admit(self, job: Job[Any]) -> None:
        """Hook called for each new job before it is queued; it may raise to refuse it."""

    # -- dispatch and worker callbacks ----------------------------------------------------

    def _dispatch(self, assignments: list[tuple[Worker, Job[Any]]]) -> None:
        for worker, job in assignments:
            self._in_flight[job] = worker
            try:
                worker.send(job)
            except Exception as exc:
                del self._in_flight[job]
                self._settle(job, None, exc)
                self._dispatch(self._dispatcher.finished(worker))
            else:
                self._after_send(worker)

    def _settle(self, job: Job[Any], value: Any, error: BaseException | None) -> None:
        if job.state is JobState.CANCELLED:
            return
        job._finish()
        future = job.future
        if future.done():
            return
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)

    def job_started(self, worker: Worker, job: Job[Any]) -> None:
        """Worker callback: job began running; its hard time limit counts from now."""
        if job.state is JobState.SENT:
            job.state = JobState.RUNNING
        if job.time_limit is not None and self._loop is not None:
            self._deadlines[job] = self._loop.call_later(
                job.time_limit, self._time_limit_passed, worker, job
            )

    def _time_limit_passed(self, worker: Worker, job: Job[Any]) -> None:
        """The hard limit passed: the caller gets TimeLimitExceeded now, and the worker,
        which may be stuck anywhere (a C call, a lock, signals blocked), is killed."""
        self._deadlines.pop(job, None)
        if self._in_flight.get(job) is not worker or job.done():
            return
        assert job.time_limit is not None
        self._settle(job, None, TimeLimitExceeded(job.time_limit))
        worker.cancel(job, grace=0)

    def job_done(
        self, worker: Worker, job: Job[Any], value: Any, error: BaseException | None
    ) -> None:
        """Worker callback: job finished; the worker's slot goes to the next job first."""
        if self._deadlines:
            self._disarm(job)
        if self._in_flight.pop(job, None) is not None:
            self._after_job(worker)
            self._dispatch(self._dispatcher.finished(worker))
            if self._retiring:
                self._stop_if_idle(worker)
        self._settle(job, value, error)
        if self._drained is not None:
            self._check_drained()

    def worker_lost(
        self,
        worker: Worker,
        error: CorralError,
        unstarted: list[Job[Any]],
        started: list[Job[Any]],
    ) -> None:
        """Worker callback: it died. Unstarted jobs go back to the front, in their order;
        started ones fail with error, or run again while they have retries left."""
        self._dispatcher.remove_worker(worker)
        self._workers.pop(worker, None)
        retiring = worker in self._retiring  # its replacement is already on its way
        self._retiring.discard(worker)
        assignments: list[tuple[Worker, Job[Any]]] = []
        for job in started:
            self._disarm(job)
            self._in_flight.pop(job, None)
            if job.state is JobState.CANCELLED or job.done():
                continue
            if job.retries > 0:
                job.retries -= 1
                job.state = JobState.PENDING
                assignments.extend(self._dispatcher.requeue(job))
            else:
                self._settle(job, None, error)
        for job in reversed(unstarted):
            self._in_flight.pop(job, None)
            if job.state is JobState.CANCELLED or job.done():
                continue
            if job.deliveries >= MAX_DELIVERIES:
                lost = WorkerLostError(
                    worker.name,
                    getattr(error, "exitcode", None),
                    getattr(error, "signal", None),
                    f"the job killed {job.deliveries} workers before it could start; "
                    "unpickling its arguments may kill the process",
                )
                self._settle(job, None, lost)
                continue
            job.state = JobState.PENDING
            assignments.extend(self._dispatcher.requeue(job))
        self._dispatch(assignments)
        if not retiring:
            self._worker_gone(worker, error)
        if self._drained is not None:
            self._check_drained()

    def _retire(self, worker: Worker) -> None:
        """Give worker no more jobs; stop it once it has finished those it holds."""
        self._dispatcher.retire(worker)
        self._retiring.add(worker)
        self._worker_retired(worker)
        self._stop_if_idle(worker)

    def _stop_if_idle(self, worker: Worker) -> None:
        if worker in self._retiring and not self._dispatcher.load(worker):
            self._retiring.discard(worker)
            self._dispatcher.remove_worker(worker)
            self._workers.pop(worker, None)
            self._spawn_task(worker.stop())

    def _worker_retired(self, worker: Worker) -> None:
        """Hook: a pool starts the retiring worker's replacement here."""

    def _after_send(self, worker: Worker) -> None:
        """Hook: a pool retires a worker here once it has been sent its quota of jobs."""

    def _after_job(self, worker: Worker) -> None:
        """Hook: a job on worker ended; a pool checks memory and retirement here."""

    def _disarm(self, job: Job[Any]) -> None:
        deadline = self._deadlines.pop(job, None)
        if deadline is not None:
            deadline.cancel()

    def _worker_gone(self, worker: Worker, error: CorralError) -> None:
        """Hook: a pool replaces the worker here."""

    def cancel_job(self, job: Job[Any]) -> None:
        """Job callback: the job was cancelled. Pending: dropped. Sent: stopped in its worker."""
        if self._dispatcher.discard(job):
            self._check_drained()
            return
        worker = self._in_flight.get(job)
        if worker is not None:
            worker.cancel(job)

    # -- helpers --------------------------------------------------------------------------

    async def _start_worker(self, worker: Worker) -> None:
        await worker.start(self)
        if self._state is QueueState.CLOSED:
            await worker.stop()
            return
        self._workers[worker] = None
        self._dispatch(self._dispatcher.add_worker(worker, self._capacity, worker.series))

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("this queue belongs to another event loop")
        return loop

    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        loop = self._loop or self._bind_loop()
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _broken_error(self) -> BaseException:
        """A fresh copy of the reason this queue cannot serve (one raised exception per
        call, so tracebacks do not pile up on a shared instance)."""
        broken = self._broken
        assert broken is not None
        error = copy.copy(broken)
        error.__cause__ = broken.__cause__
        return error

    def _fail_pending(self, error: BaseException) -> None:
        for job in self._dispatcher.drain():
            self._settle(job, None, error)

    def _check_open(self, action: str) -> None:
        if self._state is not QueueState.OPEN:
            raise PoolClosedError(action, self._state.value)


def check_limit(name: str, value: float | None) -> None:
    """A time limit is None or a positive number of seconds."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
    ):
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
