"""The engine under ``TaskQueue``: which job goes to which worker, and what each worker
callback does to the jobs.

Jobs wait in the ``Dispatcher``'s order and are handed to workers as the strategy allows;
what to do when a worker dies (requeue what it had not started, fail or retry what it had),
when a hard time limit passes, when a stream sends items or a task reports, and how a new
worker joins (start, replay the broadcasts, then serve) is decided here, once, for every
kind of worker. The public calls are ``TaskQueue``'s; ``Pool`` fills in the hooks that keep
its own workers alive.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import functools
import itertools
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, Literal

from ._errors import (
    CorralError,
    PoolClosedError,
    TimeLimitExceeded,
    WorkerLostError,
    WorkerStartupError,
)
from ._job import Job, JobState
from ._queue import Dispatcher
from ._stats import Timings
from ._wire import describe

if TYPE_CHECKING:
    from .workers._base import Worker

# A job whose delivery killed this many workers before any acknowledged it is failed: the
# culprit is the job itself (an argument whose unpickling kills the process), and retrying
# it forever would kill workers forever.
MAX_DELIVERIES = 3

Strategy = Literal["fair", "prefetch", "auto"]
STRATEGIES = ("fair", "prefetch", "auto")

# Under strategy="auto", the work a worker may have queued behind the job it runs, judged by
# its last job's run time: calls of 2 ms or more go one at a time (a round trip is about
# 0.1 ms: prefetching them would gain under 5% and could leave them stuck behind a long
# call while another worker idles); shorter ones go several at a time, up to ``prefetch``.
AUTO_AHEAD = 0.002


class QueueState(enum.Enum):
    """Life of a queue."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class QueueCore:
    """Jobs, workers and the rules between them; see the module docstring."""

    def __init__(self, *, strategy: Strategy = "fair", prefetch: int = 4) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1:
            raise ValueError(f"prefetch must be a positive int, not {prefetch!r}")
        self.strategy = strategy
        self.prefetch = prefetch
        # A new worker's capacity: "auto" starts at one job, until one proves short.
        self._capacity = prefetch if strategy == "prefetch" else 1
        self._adaptive = strategy == "auto"
        self._dispatcher: Dispatcher[Worker, Job[Any]] = Dispatcher()
        self._in_flight: dict[Job[Any], Worker] = {}
        self._deadlines: dict[Job[Any], asyncio.TimerHandle] = {}  # hard time limits
        self._retiring: set[Worker] = set()  # taking no new jobs; stopped once idle
        self._workers: dict[Worker, None] = {}  # attached and started
        self._starting: set[Worker] = set()  # attached, not yet serving
        self._broadcasts: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []  # replayed
        self._timings = Timings()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = QueueState.OPEN
        self._drained: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._broken: BaseException | None = None  # set when no worker can ever serve

    async def _until_sized(self) -> None:
        """Hook: wait until the queue knows how many workers it will have (a pool whose
        size a cluster decides, connecting); ``map`` sizes its chunks by it."""

    async def _stop_workers(self, *, kill: bool) -> None:
        starting = list(self._starting)
        self._starting.clear()
        workers = list(self._workers)
        for worker in workers:
            self._forget(worker)
        await asyncio.gather(
            *(w.kill() for w in starting), *(w.kill() if kill else w.stop() for w in workers)
        )
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

    def _worker_count(self) -> int:
        """Workers serving now, or those a pool is about to start (for chunk sizes)."""
        return len(self._workers) or self._expected_workers()

    def _check_broadcast(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Hook: a process pool checks here that the call pickles."""

    def _pinned_job(
        self,
        worker: Worker,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        loop: asyncio.AbstractEventLoop,
    ) -> Job[Any]:
        job: Job[Any] = Job(self, next(self._ids), fn, args, loop)
        job.worker = worker
        job.submitted_at = perf_counter()
        return job

    async def _replay(self, worker: Worker) -> None:
        """Run every remembered broadcast on a new worker, in order, before it serves."""
        loop = self._loop or self._bind_loop()
        i = 0
        while i < len(self._broadcasts):  # a broadcast made meanwhile is replayed too
            fn, args = self._broadcasts[i]
            i += 1
            job = self._pinned_job(worker, fn, args, loop)
            self._dispatch([(worker, job)])
            try:
                await job.future
            except (WorkerLostError, WorkerStartupError, asyncio.CancelledError):
                raise
            except BaseException as exc:
                raise WorkerStartupError(
                    1, f"replaying broadcast {describe(fn)} raised {type(exc).__name__}: {exc}"
                ) from exc

    def _expected_workers(self) -> int:
        """How many workers the queue will have; a pool knows before they are up."""
        return len(self._workers)

    def _admit(self, job: Job[Any]) -> None:
        """Hook called for each new job before it is queued; it may raise to refuse it."""

    def _dispatch(self, assignments: list[tuple[Worker, Job[Any]]]) -> None:
        while assignments:
            refused: list[tuple[Worker, Job[Any]]] = []
            for worker, job in assignments:
                self._in_flight[job] = worker
                job.sent_at = perf_counter()
                try:
                    worker.send(job)
                except Exception as exc:
                    del self._in_flight[job]
                    self._settle(job, None, exc)
                    # The freed slot's next jobs are sent after this batch, in a loop: a
                    # worker refusing every job must not cost a stack frame per job
                    # (RecursionError, a job never ended).
                    refused.extend(self._dispatcher.finished(worker))
                else:
                    self._after_send(worker)
            assignments = refused

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

    def job_items(self, worker: Worker, job: Job[Any], items: list[Any]) -> None:
        """Worker callback: the next items of a stream. The first ones free the worker's
        slot: the stream goes on beside the worker's other jobs."""
        stream = job.stream
        if stream is None or job.done():
            return
        if not stream.released:
            stream.released = True
            stream.grant = functools.partial(self._grant, job)
            if job in self._in_flight:
                self._dispatch(self._dispatcher.finished(worker))
        stream.feed(items)

    def _grant(self, job: Job[Any], n: int) -> None:
        worker = self._in_flight.get(job)
        if worker is not None:
            worker.credit(job, n)

    def job_report(self, worker: Worker, job: Job[Any], obj: Any) -> None:
        """Worker callback: the running job called ``corral.report(obj)``."""
        if not job.done():
            job._reported(obj)

    def job_done(
        self, worker: Worker, job: Job[Any], value: Any, error: BaseException | None
    ) -> None:
        """Worker callback: job finished; the worker's slot goes to the next job first."""
        if self._deadlines:
            self._disarm(job)
        now = perf_counter()
        timings = self._timings  # stats: a few stores per call, the sums wait for stats()
        timings.calls += 1
        run = job.run_time
        timings.samples.append((job.submitted_at, job.sent_at, now, run))
        worker.busy_time += now - job.sent_at if run is None else run
        if error is not None and job.state is not JobState.CANCELLED:
            timings.failed += 1
        if self._in_flight.pop(job, None) is not None:
            self._after_job(worker)
            if job.stream is None or not job.stream.released:
                capacity = self._capacity_after(run) if self._adaptive else None
                self._dispatch(self._dispatcher.finished(worker, capacity))
            if self._retiring:
                self._stop_if_idle(worker)
        self._settle(job, value, error)
        if self._drained is not None:
            self._check_drained()

    def _capacity_after(self, run: float | None) -> int:
        """Under "auto": the jobs a worker may hold after a job that ran run seconds: the
        one it runs, and behind it as many such jobs as fit in ``AUTO_AHEAD``."""
        if run is None or run >= AUTO_AHEAD:  # long, or not measured (cancelled)
            return 1
        if run * (self.prefetch - 1) <= AUTO_AHEAD:
            return self.prefetch
        return 1 + int(AUTO_AHEAD / run)

    def worker_lost(
        self,
        worker: Worker,
        error: CorralError,
        unstarted: list[Job[Any]],
        started: list[Job[Any]],
    ) -> None:
        """Worker callback: it died. Unstarted jobs go back to the front, in their order;
        started ones fail with error, or run again while they have retries left."""
        starting = worker in self._starting  # lost while replaying broadcasts
        serving = self._forget(worker, error)
        retiring = worker in self._retiring  # its replacement is already on its way
        self._retiring.discard(worker)
        assignments: list[tuple[Worker, Job[Any]]] = []
        for job in started:
            self._disarm(job)
            self._in_flight.pop(job, None)
            if job.state is JobState.CANCELLED or job.done():
                continue
            if job.worker is not None or (job.stream is not None and job.stream.released):
                self._settle(job, None, error)  # a broadcast, or a stream already under way
            elif job.retries > 0:
                job.retries -= 1
                job.state = JobState.PENDING
                assignments.extend(self._dispatcher.requeue(job))
            else:
                self._settle(job, None, error)
        for job in reversed(unstarted):
            self._in_flight.pop(job, None)
            if job.state is JobState.CANCELLED or job.done():
                continue
            if job.worker is not None:
                self._settle(job, None, error)
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
        if serving and not retiring and not starting:
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
        """Stop a retiring worker once it holds nothing: no job, and no open stream (a
        stream frees its slot but lives in the worker until its consumer is done)."""
        if (
            worker in self._retiring
            and not self._dispatcher.load(worker)
            and all(w is not worker for w in self._in_flight.values())
        ):
            self._retiring.discard(worker)
            self._forget(worker)
            self._spawn_task(worker.stop())

    def _forget(self, worker: Worker, error: CorralError | None = None) -> bool:
        """Take worker out of service; broadcasts pinned to it that it never took fail.
        Returns whether it was serving."""
        for job in self._dispatcher.remove_worker(worker):
            self._settle(
                job,
                None,
                error
                or WorkerLostError(
                    worker.name, detail="it left the queue before running the broadcast"
                ),
            )
        return self._workers.pop(worker, 0) is None

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
        """Hook: a serving worker died. A pool replaces it; a plain queue fails the
        pending jobs that no worker left can take."""
        self._check_servable()

    def _worker_detached(self, worker: Worker) -> None:
        """Hook: ``detach`` took worker out of service."""

    def _servable(self, series: str | None) -> bool:
        """Whether a job of series can ever run: some attached worker serves it, or none
        is attached and one may still come."""
        workers = [*self._workers, *self._starting]
        if not workers:
            return self._may_gain_workers()
        return any(w.serves(series) for w in workers)

    def _may_gain_workers(self) -> bool:
        """Hook: whether a worker may still join. A plain queue takes new workers only
        while open: closing, with its last worker gone, its queued jobs can never run."""
        return self._state is QueueState.OPEN

    def _unservable_error(self, series: str | None) -> BaseException:
        if self._broken is not None:  # a pool that gave up starting its workers
            return self._broken_error()
        if not (self._workers or self._starting):  # closing, every worker gone
            return PoolClosedError("run this job", f"{self._state.value} with no worker left")
        return ValueError(self._unservable_message(series))

    def _unservable_message(self, series: str | None) -> str:
        served = sorted({s for w in [*self._workers, *self._starting] for s in w.series or ()})
        return (
            f"no worker of this queue serves series={series!r} (they serve {served}); "
            f"attach one with series=[{series!r}]"
        )

    def _check_servable(self) -> None:
        """Fail the pending jobs that no attached worker can take (instead of letting
        them wait forever)."""
        if not self._dispatcher:
            return
        for series in self._dispatcher.pending_series():
            if not self._servable(series):
                error = self._unservable_error(series)
                for job in self._dispatcher.withdraw_series(series):
                    self._settle(job, None, error)
        self._check_drained()

    def _unstarted(self, job: Job[Any]) -> bool:
        """Whether job has surely not begun: queued here, or sent ahead to a worker that
        says it has not begun it."""
        if job.state is JobState.PENDING:
            return True
        worker = self._in_flight.get(job)
        return (
            job.state is JobState.SENT and worker is not None and not worker.may_have_started(job)
        )

    def cancel_job(self, job: Job[Any]) -> None:
        """Job callback: the job was cancelled. Pending: dropped. Sent: stopped in its worker."""
        if self._dispatcher.discard(job):
            self._check_drained()
            return
        worker = self._in_flight.get(job)
        if worker is not None:
            worker.cancel(job)

    async def _start_worker(self, worker: Worker) -> None:
        """Start worker, replay the broadcasts on it, then let it take jobs."""
        try:
            await worker.start(self)
            if self._broadcasts:
                await self._replay(worker)
        except (WorkerStartupError, WorkerLostError) as exc:
            self._starting.discard(worker)
            await worker.kill()
            self._startup_failed(worker, exc)
            return
        except BaseException:
            self._starting.discard(worker)
            await worker.kill()
            raise
        self._starting.discard(worker)
        if self._state is QueueState.CLOSED or (
            self._state is not QueueState.OPEN and not (self._dispatcher or self._in_flight)
        ):
            await worker.stop()
            return
        worker.ready_at = perf_counter()
        self._workers[worker] = None
        self._dispatch(
            self._dispatcher.add_worker(worker, self._capacity, worker.series, self._quota())
        )
        self._worker_ready(worker)

    def _quota(self) -> int | None:
        """Hook: how many jobs a new worker may run before it is recycled (None: no cap)."""
        return None

    def _worker_ready(self, worker: Worker) -> None:
        """Hook: worker serves now."""

    def _startup_failed(self, worker: Worker, exc: CorralError) -> None:
        """Hook: worker could not start. A plain queue raises from ``attach``'s task and
        fails the pending jobs no worker left can take; a pool retries."""
        self._check_servable()
        if isinstance(exc, WorkerLostError):
            raise WorkerStartupError(1, f"{worker.name} died while starting: {exc}") from exc
        raise exc

    def _bind_loop(self, action: str = "start") -> asyncio.AbstractEventLoop:
        """The running loop, which must be this queue's own (the first loop it is used on).

        Every public call checks this first, so a call from anywhere else is refused before
        it does anything: the queue's futures, pipes and timers live on its loop, where work
        begun from another loop would run and only then fail its caller, and where a wait
        from a new loop, once the queue's own has closed, would never end."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"cannot {action}: no event loop is running in this thread; call it from a "
                f"coroutine on the {type(self).__name__}'s loop (from another thread, "
                "through asyncio.run_coroutine_threadsafe)"
            ) from None
        if loop is not self._loop:  # the one comparison a call pays on the hot path
            self._adopt_loop(loop, action)
        return loop

    def _adopt_loop(self, loop: asyncio.AbstractEventLoop, action: str) -> None:
        """Make loop the queue's own if it has none yet; else refuse the call."""
        own, name = self._loop, type(self).__name__
        if own is None:
            self._loop = loop
        elif own.is_closed():
            raise RuntimeError(
                f"cannot {action}: this {name}'s event loop is closed; a {name} serves only "
                f"the loop it was first used on, so make a new {name} on this one"
            )
        else:
            raise RuntimeError(
                f"cannot {action}: this {name} belongs to another event loop; call it from "
                "a coroutine on that loop (from another thread, through "
                "asyncio.run_coroutine_threadsafe)"
            )

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

    def _check_open(self, action: str) -> asyncio.AbstractEventLoop:
        """Refuse action unless it is made on the queue's loop and the queue is open;
        returns that loop."""
        loop = self._bind_loop(action)
        if self._state is not QueueState.OPEN:
            raise PoolClosedError(action, self._state.value)
        return loop


def check_limit(name: str, value: float | None) -> None:
    """A time limit is None or a positive number of seconds."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
    ):
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
