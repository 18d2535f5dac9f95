"""``TaskQueue``: calls in, workers of any kind out, and every rule between them.

The queue takes calls (``submit``, ``run``, ``map``, ``imap``, ``iterate``, ``broadcast``)
and keeps them in the ``Dispatcher``'s priority order; the dispatcher decides which worker
gets which job and when (pure decisions); the queue carries them out and owns the life
cycles: every job state transition (``_job.move``), and one record per worker
(``Roster``). What happens when a worker reports back (a job started, items of a stream,
a report, a result, its death) is decided here, once, for every kind of worker: a dead
worker's unstarted jobs go back to the front, started ones fail or retry; a hard time
limit kills the worker; a new worker starts, replays the broadcasts, then serves.

A queue serves with the workers attached to it. Given a worker source (``Pool`` is a
queue with one, see ``_sources``) it also keeps the source's workers alive: starts them,
replaces the lost, recycles them at their quota or memory limit, and gives up, failing
the calls, when they cannot start. Each of these events is logged (``_log``) where it is
decided here; a call that succeeds logs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import functools
import itertools
from collections.abc import AsyncIterable, Callable, Coroutine, Iterable
from time import perf_counter
from typing import TYPE_CHECKING, Any, Literal, TypeVar, TypeVarTuple, Unpack

from . import _log as log
from ._checks import check_count, check_seconds
from ._dispatcher import Dispatcher
from ._errors import (
    CorralError,
    PoolClosedError,
    TimeLimitExceeded,
    WorkerLostError,
    WorkerStartupError,
)
from ._job import Job, JobCoroutine, JobState, add_report, move, new_job, settle, take_retry
from ._roster import Roster, Standing, WorkerRecord
from ._sources import GiveUp, WorkerSource
from ._stats import Percentiles, QueueStats, Timings, parent_rss, worker_stats
from ._stream import WINDOW, ItemStream, StreamIterator
from ._wire import describe

if TYPE_CHECKING:
    from ._mapping import MapIterator, Queue
    from .workers._base import Worker

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

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

# The default most jobs in flight per worker: under "prefetch", whatever they take; under
# "auto", for calls short enough that this many fit in AUTO_AHEAD (no-ops: 32 of them sent
# together make 76k calls/s on 2 workers where 4 made 48k, BENCHMARKS.md).
PREFETCH = 4
AUTO_PREFETCH = 32


class QueueState(enum.Enum):
    """Life of a queue."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class TaskQueue:
    """A priority queue of calls served by the workers attached to it.

    Args:
        strategy: ``"auto"`` (the default) decides per worker after each job: one at a
            time after a job of 2 ms or more, else as many as keep about 2 ms of work
            queued (at most ``prefetch``), which saves short calls a round trip each
            (about 1.5x the calls per second of ``"fair"`` on no-ops: BENCHMARKS.md);
            ``"fair"`` hands a job only to an idle worker; ``"prefetch"`` keeps up to
            ``prefetch`` jobs in flight per worker. Under auto and prefetch a job queued in
            a worker behind a call that turns out long waits for that call, even while
            another worker is idle: ``"fair"`` never lets it.
        prefetch: jobs in flight per worker under ``"prefetch"`` (default 4); the most
            under ``"auto"`` (default 32: its 2 ms bound, not the count, keeps the work
            queued in a worker short; sending 32 no-ops at a time rather than 4 halves the
            pipe writes and reads per call).
    """

    def __init__(self, *, strategy: Strategy = "auto", prefetch: int | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
        if prefetch is None:
            prefetch = AUTO_PREFETCH if strategy == "auto" else PREFETCH
        check_count("prefetch", prefetch)
        self.strategy = strategy
        self.prefetch = prefetch
        # A new worker's capacity: "auto" starts at one job, until one proves short.
        self._capacity = prefetch if strategy == "prefetch" else 1
        self._adaptive = strategy == "auto"
        self._dispatcher: Dispatcher[Worker, Job[Any]] = Dispatcher()
        self._roster = Roster()
        self._in_flight: dict[Job[Any], Worker] = {}
        self._deadlines: dict[Job[Any], asyncio.TimerHandle] = {}  # hard time limits
        self._broadcasts: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []  # replayed
        self._timings = Timings()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = QueueState.OPEN
        self._drained: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._broken: BaseException | None = None  # set when no worker can ever serve
        # The worker source this queue keeps alive (a Pool's); None: attached workers only.
        self._source: WorkerSource | None = None
        self._started = False  # the source's workers have been launched
        self._connecting: asyncio.Task[None] | None = None  # a cluster source, until up
        self._ready: asyncio.Event | None = None  # set as each owned worker serves
        # Recycling, off unless the source asks for it: these two cost nothing when None.
        self._quota: int | None = None
        self._memory_limit: int | None = None

    def _keep(self, source: WorkerSource) -> None:
        """Keep source's workers alive (called once, by ``Pool``, before any call)."""
        self._source = source
        self._quota = source.max_tasks_per_child
        self._memory_limit = source.max_memory_per_child

    # -- the public calls -----------------------------------------------------------------

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
        return self._roster.started()

    def attach(self, worker: Worker) -> asyncio.Task[None]:
        """Start worker and let it serve this queue; returns the task that starts it.

        Awaiting the task is optional: it ends once the worker serves (after replaying
        every ``broadcast``), or raises ``WorkerStartupError`` if it could not start.
        """
        self._check_open("attach a worker")
        if worker in self._roster:
            raise ValueError(f"{worker!r} is already attached to this queue")
        if worker.alive or worker.tasks_sent:
            raise ValueError(f"{worker!r} has been started already; attach a new worker")
        self._roster.join(worker, owned=False)
        return self._spawn_task(self._start_worker(worker))

    async def detach(self, worker: Worker) -> None:
        """Give worker no more jobs, let it finish those it holds, then stop it. A job it
        could not finish (it died) is handed back to the queue, or fails if it had started.
        """
        self._bind_loop("detach a worker")
        if self._roster.standing(worker) not in (Standing.SERVING, Standing.RETIRING):
            raise ValueError(f"{worker!r} is not attached to this queue")
        owned = self._roster.disown(worker)
        self._forget(worker)
        if owned:
            assert self._source is not None
            self._source.size -= 1  # the pool shrinks by the one taken from it
        self._check_servable()
        await self._stop_worker(worker)

    async def close(self) -> None:
        """Run every queued and running job to its end, then stop the workers. Idempotent.

        Queued jobs that no worker left can take (none is attached, or their series is
        served by none) fail with ``PoolClosedError`` or ``ValueError``: closing, the
        queue takes no new worker that could run them."""
        self._bind_loop("close")  # from another loop it could only hang
        if self._state is not QueueState.CLOSED:
            self._state = QueueState.CLOSING
            self._check_servable()  # no worker may join now: jobs none left can take fail
            await self._wait_drained()
            self._state = QueueState.CLOSED
            await self._stop_workers(kill=False)
        if self._source is not None:
            await self._source.close()  # after the workers that used what it reached

    async def terminate(self) -> None:
        """Kill the workers now; every unfinished job is cancelled. Idempotent."""
        self._bind_loop("terminate")
        self._state = QueueState.CLOSED
        for job in [*self._dispatcher.drain(), *self._in_flight]:
            if job.state is not JobState.DONE and job.state is not JobState.CANCELLED:
                move(job, JobState.CANCELLED)  # the workers die anyway: no need to stop it
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
        if self._source is not None:
            await self._source.close()

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
        return self._submit(
            fn,
            args,
            priority=priority,
            series=series,
            retries=retries,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
        )

    def iterate(
        self,
        fn: Callable[..., Iterable[T]],
        /,
        *args: Any,
        priority: float = 0,
        series: str | None = None,
        window: int = WINDOW,
    ) -> StreamIterator[T]:
        """Run fn(*args) in a worker and stream the items of the iterable it returns:
        ``async for item in queue.iterate(read_rows, path)``.

        The worker holds the live iterator and sends items in batches, at most ``window``
        ahead of the consumer, and serves other jobs while the consumer is slow. Breaking
        out of the loop (or ``aclose()``, or cancelling) closes the generator in the
        worker, so its ``finally`` runs. An exception in the generator is raised at the
        item where it happened; a worker lost mid-stream ends it with ``WorkerLostError``.
        """
        check_count("window", window, minimum=2)
        job = self._submit(
            fn,
            args,
            priority=priority,
            series=series,
            retries=0,
            time_limit=None,
            soft_time_limit=None,
            stream=ItemStream(window),
        )
        return StreamIterator(job)

    def run(
        self,
        fn: Callable[[Unpack[Ts]], T],
        /,
        *args: *Ts,
        priority: float = 0,
        series: str | None = None,
        retries: int = 0,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
    ) -> Coroutine[Any, Any, T]:
        """Run fn(*args) in a worker: ``await pool.run(fn, x)`` gives its value (or raises
        its exception).

        Called on the queue's loop, the call is queued at once, as by ``submit``, and what
        this returns is its job, which asyncio takes as a coroutine (``create_task``, a
        ``TaskGroup``) or as a future (``gather``, ``wait_for``): gathering many calls
        costs no task per call, and bad arguments raise here, at the call. Called where no
        loop runs (another thread, for ``asyncio.run_coroutine_threadsafe``), it returns a
        coroutine that queues the call once it runs on the queue's loop.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._run_later(
                fn,
                args,
                priority=priority,
                series=series,
                retries=retries,
                time_limit=time_limit,
                soft_time_limit=soft_time_limit,
            )
        return self._submit(  # type: ignore[return-value]  # made as a JobCoroutine
            fn,
            args,
            priority=priority,
            series=series,
            retries=retries,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            kind=JobCoroutine,
        )

    async def _run_later(self, fn: Callable[..., T], args: tuple[Any, ...], **options: Any) -> T:
        return await self._submit(fn, args, **options)

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
        progress: bool | str = False,
    ) -> list[T]:
        """Return ``[fn(x) for x in iterable]`` computed by the workers, in input order.

        Small calls are grouped into chunks (one job each) so their overhead is shared;
        ``chunksize`` overrides the automatic size. The first exception raised by a call is
        raised here and the rest of the map is cancelled. ``progress`` shows a progress bar
        (see ``imap``).
        """
        self._bind_loop("map")  # before sizing, which may start a pool's workers
        options = {"priority": priority, "series": series, "retries": retries}
        await self._until_sized()
        from ._mapping import map_list  # noqa: PLC0415  # see _as_queue

        return await map_list(
            self._as_queue(), fn, iterable, chunksize=chunksize, options=options, progress=progress
        )

    def imap(
        self,
        fn: Callable[[Any], T],
        iterable: Iterable[Any] | AsyncIterable[Any],
        /,
        *,
        ordered: bool = True,
        chunksize: int | None = None,
        priority: float = 0,
        series: str | None = None,
        retries: int = 0,
        progress: bool | str = False,
    ) -> MapIterator[T]:
        """Yield ``fn(x)`` for each x of iterable as the workers compute them: in input
        order, or as they finish with ``ordered=False``.

        The input is read lazily (an endless generator works) and a bounded number of jobs
        is kept in flight; small calls are grouped into chunks automatically unless
        ``chunksize`` is given. Breaking out of the loop cancels the jobs in flight. The
        first exception raised by a call is raised here. ``progress=True`` shows a
        progress bar with rate and ETA where someone is watching: a widget in a Jupyter
        notebook, text when stderr is a terminal, nothing on a file or pipe; ``"always"``
        shows it anyway.
        """
        self._check_call(series, retries, "imap")  # here, not at the first item
        options = {"priority": priority, "series": series, "retries": retries}
        from ._mapping import imap_items  # noqa: PLC0415  # see _as_queue

        return imap_items(
            self._as_queue(),
            fn,
            iterable,
            ordered=ordered,
            chunksize=chunksize,
            options=options,
            progress=progress,
        )

    async def broadcast(self, fn: Callable[..., T], /, *args: Any) -> list[T]:
        """Run fn(*args) once on every worker serving now; return their values in the
        order of ``workers``.

        Meant for state a worker keeps (load a model, open a connection): the call is
        remembered and replayed on every worker that starts later (replacements, recycled
        workers, ``resize``, ``attach``) before it takes a job. If fn raises on any
        worker, the first exception is raised here and the call is not remembered. If a
        worker is lost or leaves before running it, ``WorkerLostError`` is raised, and the
        call stays remembered: its replacement runs it.
        """
        loop = self._check_open("broadcast")
        if not callable(fn):
            raise TypeError(f"the function to broadcast must be callable, not {fn!r}")
        args = tuple(args)
        source = self._source
        if source is not None:
            source.check_broadcast(fn, args)
            if (
                not self._started
                or self._connecting is not None
                or self._kept_serving() < source.size
            ):
                await self._start_source()  # every worker of the pool takes part
        record = (fn, args)
        self._broadcasts.append(record)  # workers starting from now on replay it
        jobs = []
        for worker in self._roster.started():
            if self._roster.standing(worker) is Standing.RETIRING:
                continue  # its replacement, already on its way, replays the call
            job = self._pinned_job(worker, fn, args, loop)
            jobs.append(job)
            self._dispatch(self._dispatcher.pin(worker, job))
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        except WorkerLostError:
            raise  # the call itself was fine; the lost worker's replacement replays it
        except BaseException:
            for job in jobs:
                job.cancel()
            if record in self._broadcasts:
                self._broadcasts.remove(record)
            raise

    def stats(self) -> QueueStats:
        """A snapshot of the workers and of recent calls' timings (``print`` it)."""
        now = perf_counter()
        workers = []
        for worker in self._roster.all():
            load = self._dispatcher.load(worker)
            standing = self._roster.standing(worker)
            if standing is Standing.SERVING:
                state = "busy" if load else "idle"
            else:
                state = standing.value if standing is not None else "gone"
            workers.append(worker_stats(worker, state, load, now))
        wait, transfer, run = self._timings.split()
        return QueueStats(
            workers=tuple(workers),
            queued=len(self._dispatcher),
            in_flight=len(self._in_flight),
            calls=self._timings.calls,
            failed=self._timings.failed,
            wait=Percentiles.of(wait),
            transfer=Percentiles.of(transfer),
            run=Percentiles.of(run),
            rss=parent_rss(),
        )

    def unstarted(self, job: Job[Any]) -> bool:
        """Whether job has surely not begun: queued here, or sent ahead to a worker that
        says it has not begun it."""
        if job.state is JobState.PENDING:
            return True
        worker = self._in_flight.get(job)
        return (
            job.state is JobState.SENT and worker is not None and not worker.may_have_started(job)
        )

    # -- taking calls -----------------------------------------------------------------------

    def _submit(
        self,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        *,
        priority: float,
        series: str | None,
        retries: int,
        time_limit: float | None,
        soft_time_limit: float | None,
        stream: ItemStream | None = None,
        kind: type[Job[Any]] = Job,
    ) -> Job[T]:
        loop = self._check_call(series, retries)
        if not callable(fn):
            raise TypeError(f"the function to run must be callable, not {fn!r}")
        check_seconds("time_limit", time_limit)
        check_seconds("soft_time_limit", soft_time_limit)
        job: Job[T] = new_job(
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
            kind=kind,
        )
        job.stream = stream
        source = self._source
        if source is not None:
            source.prepare(job)  # may raise (it pickles a process pool's call)
            if not self._started:
                self._launch()  # a pool used without `async with` starts on its first call
        job.submitted_at = perf_counter()
        self._dispatch(self._dispatcher.push(job))
        return job

    def _check_call(
        self, series: str | None, retries: int, action: str = "submit"
    ) -> asyncio.AbstractEventLoop:
        """The checks every call passes, raised at the call that made them; returns the
        queue's loop, which is the one running the call."""
        loop = self._bind_loop(action)
        if self._broken is not None:  # more telling than "closed": why it cannot serve
            raise self._broken_error()
        if self._state is not QueueState.OPEN:
            raise PoolClosedError("submit", self._state.value)
        if series is not None and not self._servable(series):
            raise ValueError(self._unservable_message(series))
        check_count("retries", retries, minimum=0)
        return loop

    def _check_open(self, action: str) -> asyncio.AbstractEventLoop:
        """Refuse action unless it is made on the queue's loop and the queue is open;
        returns that loop."""
        loop = self._bind_loop(action)
        if self._state is not QueueState.OPEN:
            raise PoolClosedError(action, self._state.value)
        return loop

    def _pinned_job(
        self,
        worker: Worker,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        loop: asyncio.AbstractEventLoop,
    ) -> Job[Any]:
        job: Job[Any] = new_job(self, next(self._ids), fn, args, loop)
        job.worker = worker
        job.submitted_at = perf_counter()
        return job

    def _as_queue(self) -> Queue:
        """What map and imap use of this queue."""
        # _mapping loads with the first map or imap, not with every queue: a program that
        # only runs calls never pays for it.
        from ._mapping import Queue  # noqa: PLC0415

        return Queue(self.submit, self._worker_count, self._bind_loop)

    def _worker_count(self) -> int:
        """Workers serving now, or those a pool is about to start (for chunk sizes)."""
        return len(self._roster) or (0 if self._source is None else self._source.size)

    # -- handing jobs to workers ------------------------------------------------------------

    def _dispatch(self, assignments: list[tuple[Worker, Job[Any]]]) -> None:
        while assignments:
            refused: list[tuple[Worker, Job[Any]]] = []
            for worker, job in assignments:
                self._in_flight[job] = worker
                move(job, JobState.SENT)
                job.sent_at = perf_counter()
                try:
                    worker.send(job)
                except Exception as exc:
                    del self._in_flight[job]
                    settle(job, None, exc)
                    # The freed slot's next jobs are sent after this batch, in a loop: a
                    # worker refusing every job must not cost a stack frame per job
                    # (RecursionError, a job never ended).
                    refused.extend(self._dispatcher.finished(worker))
                else:
                    worker.tasks_sent += 1
                    # Retired at its quota's last send, not its last result, so that under
                    # prefetch a worker is never sent more than its quota.
                    if self._quota is not None and self._dispatcher.quota_left(worker) == 0:
                        self._recycle(worker, "max_tasks_per_child", self._quota)
            assignments = refused

    # -- what the workers report (the Host callbacks of workers._base) ---------------------

    def job_started(self, worker: Worker, job: Job[Any]) -> None:
        """Worker callback: job began running; its hard time limit counts from now."""
        if job.state is JobState.SENT:
            move(job, JobState.RUNNING)
        if job.time_limit is not None and self._loop is not None:
            self._deadlines[job] = self._loop.call_later(
                job.time_limit, self._time_limit_passed, worker, job
            )

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

    def job_report(self, worker: Worker, job: Job[Any], obj: Any) -> None:
        """Worker callback: the running job called ``corral.report(obj)``."""
        add_report(job, obj)

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
        worker.tasks_done += 1
        worker.busy_time += now - job.sent_at if run is None else run
        if error is not None and job.state is not JobState.CANCELLED:
            timings.failed += 1
        if self._in_flight.pop(job, None) is not None:
            if self._memory_limit is not None:
                self._check_memory(worker, self._memory_limit)
            if job.stream is None or not job.stream.released:
                capacity = self._capacity_after(run) if self._adaptive else None
                self._dispatch(self._dispatcher.finished(worker, capacity))
            if self._roster.retiring:
                self._stop_if_idle(worker)
        settle(job, value, error)
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
        if self._state is not QueueState.CLOSED:  # terminate's kills are no loss to report
            log.worker_lost(worker, error, started, unstarted)
        record = self._roster.get(worker)
        if record is not None and record.standing is Standing.STARTING:
            record = None  # its start fails: that is handled where it was started
        else:
            record = self._forget(worker, error)
        assignments: list[tuple[Worker, Job[Any]]] = []
        for job in started:
            self._disarm(job)
            self._in_flight.pop(job, None)
            if job.state is JobState.CANCELLED or job.done():
                continue
            if take_retry(job):
                move(job, JobState.PENDING)
                assignments.extend(self._dispatcher.requeue(job))
            else:
                self._failed_in_a_worker(job, error)
        for job in reversed(unstarted):
            self._in_flight.pop(job, None)
            if job.state is JobState.CANCELLED or job.done():
                continue
            if job.worker is not None:
                self._failed_in_a_worker(job, error)
                continue
            if job.deliveries >= MAX_DELIVERIES:
                lost = WorkerLostError(
                    worker.name,
                    getattr(error, "exitcode", None),
                    getattr(error, "signal", None),
                    f"the job killed {job.deliveries} workers before it could start; "
                    "unpickling its arguments may kill the process",
                )
                self._failed_in_a_worker(job, lost)
                continue
            move(job, JobState.PENDING)
            assignments.extend(self._dispatcher.requeue(job))
        self._dispatch(assignments)
        # A worker lost while starting is handled where its start fails; a retiring one's
        # replacement is already on its way.
        if record is not None and record.standing is Standing.SERVING:
            if record.owned:
                self._replace()
            else:
                self._check_servable()
        if self._drained is not None:
            self._check_drained()

    def _failed_in_a_worker(self, job: Job[Any], error: BaseException) -> None:
        """Fail a job a worker held that will not say how it ended (lost with the worker,
        or killed at its time limit), counted in the stats as ``job_done`` counts one."""
        self._timings.calls += 1
        self._timings.failed += 1
        settle(job, None, error)

    def cancel_job(self, job: Job[Any]) -> None:
        """Job callback: the job was cancelled. Pending: dropped. Sent: stopped in its worker."""
        if self._dispatcher.discard(job):
            self._check_drained()
            return
        worker = self._in_flight.get(job)
        if worker is not None:
            worker.cancel(job)

    def _grant(self, job: Job[Any], n: int) -> None:
        worker = self._in_flight.get(job)
        if worker is not None:
            worker.credit(job, n)

    def _time_limit_passed(self, worker: Worker, job: Job[Any]) -> None:
        """The hard limit passed: the caller gets TimeLimitExceeded now, and the worker,
        which may be stuck anywhere (a C call, a lock, signals blocked), is killed."""
        self._deadlines.pop(job, None)
        if self._in_flight.get(job) is not worker or job.done():
            return
        assert job.time_limit is not None
        self._failed_in_a_worker(job, TimeLimitExceeded(job.time_limit))
        log.killed_at_time_limit(worker, job, job.time_limit)
        worker.cancel(job, grace=0)

    def _disarm(self, job: Job[Any]) -> None:
        deadline = self._deadlines.pop(job, None)
        if deadline is not None:
            deadline.cancel()

    def _capacity_after(self, run: float | None) -> int:
        """Under "auto": the jobs a worker may hold after a job that ran run seconds: the
        one it runs, and behind it as many such jobs as fit in ``AUTO_AHEAD``."""
        if run is None or run >= AUTO_AHEAD:  # long, or not measured (cancelled)
            return 1
        if run * (self.prefetch - 1) <= AUTO_AHEAD:
            return self.prefetch
        return 1 + int(AUTO_AHEAD / run)

    # -- the workers' life in the queue ------------------------------------------------------

    async def _start_worker(self, worker: Worker) -> None:
        """Start worker, replay the broadcasts on it, then let it take jobs."""
        try:
            await worker.start(self)
            if self._broadcasts:
                await self._replay(worker)
        except (WorkerStartupError, WorkerLostError) as exc:
            record = self._roster.remove(worker)
            await worker.kill()
            if record is not None:  # else the queue gave it up meanwhile (a pool shrunk)
                self._startup_failed(worker, exc, owned=record.owned)
            return
        except BaseException:
            self._roster.remove(worker)
            await worker.kill()
            raise
        if worker not in self._roster:  # given up meanwhile (a pool shrunk, or stopping)
            await worker.kill()
            return
        if self._state is QueueState.CLOSED or (
            self._state is not QueueState.OPEN and not (self._dispatcher or self._in_flight)
        ):
            self._roster.remove(worker)
            await worker.stop()
            return
        worker.ready_at = perf_counter()
        self._roster.serve(worker)
        log.worker_started(worker)
        self._dispatch(
            self._dispatcher.add_worker(worker, self._capacity, worker.series, self._quota)
        )
        if self._source is not None:
            self._source.restarts.succeeded()
        self._wake_ready()

    def _wake_ready(self) -> None:
        """Wake whoever waits for the source's workers to serve (``start``, ``resize``)."""
        if self._ready is None:
            return
        # asyncio.run's SIGINT handler cancels the main task from the signal handler, which
        # can run between Event.set's check of a waiter and its set_result: that waiter (the
        # interrupted start) is cancelled then, and nobody is left to wake.
        with contextlib.suppress(asyncio.InvalidStateError):
            self._ready.set()

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
                log.replay_failed(worker, fn, exc)
                raise WorkerStartupError(
                    1, f"replaying broadcast {describe(fn)} raised {type(exc).__name__}: {exc}"
                ) from exc

    def _startup_failed(self, worker: Worker, exc: CorralError, *, owned: bool) -> None:
        """worker could not start. One the caller attached is theirs: ``attach``'s task
        raises, and the pending jobs no worker left can take fail. One the queue's source
        made is retried, at once or after a back-off, until the source gives up."""
        if not owned or self._source is None:
            if self._state is not QueueState.CLOSED:  # else terminate killed it starting
                log.start_failed(worker, exc, failures=1, retry_in=None)
            self._check_servable()
            if isinstance(exc, WorkerLostError):
                raise WorkerStartupError(1, f"{worker.name} died while starting: {exc}") from exc
            raise exc
        verdict = self._source.restarts.failed(worker, exc)
        if isinstance(verdict, GiveUp):
            self._give_up(verdict.error)
        elif self._state is not QueueState.CLOSED:
            failures = self._source.restarts.failures
            log.start_failed(worker, exc, failures=failures, retry_in=verdict.delay)
            if verdict.delay:
                self._spawn_task(self._retry_after(verdict.delay))
            else:
                self._add_worker()

    async def _retry_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._state is not QueueState.CLOSED and self._broken is None:
            self._add_worker()

    def _give_up(self, broken: WorkerStartupError) -> None:
        """No worker will start: fail the waiting calls (and later ones) with broken. The
        first verdict stands: workers failing as the queue terminates do not replace it."""
        if self._broken is not None:
            return
        if self._state is not QueueState.CLOSED:  # terminating, nothing is left to fail
            log.gave_up(broken)
        self._broken = broken
        self._fail_pending(broken)
        self._wake_ready()
        self._check_drained()

    def _replace(self) -> None:
        """An owned worker is gone: start its replacement, unless nothing needs one."""
        if self._state is QueueState.CLOSED or self._broken is not None:
            return
        if self._state is not QueueState.OPEN and not (self._dispatcher or self._in_flight):
            self._check_drained()
            return
        self._add_worker()

    def _add_worker(self) -> None:
        assert self._source is not None
        worker = self._source.new_worker()
        self._roster.join(worker, owned=True)
        self._spawn_task(self._start_worker(worker))

    def _recycle(self, worker: Worker, option: str, limit: int, rss: int | None = None) -> None:
        """Retire a serving worker at the limit its source's option sets (logged)."""
        if self._roster.standing(worker) is Standing.SERVING:
            log.worker_recycled(worker, option, limit, rss)
            self._retire(worker)

    def _retire(self, worker: Worker) -> None:
        """Give worker no more jobs; stop it once it has finished those it holds. An owned
        worker's replacement starts now."""
        if self._roster.standing(worker) is not Standing.SERVING:
            return  # retiring already, or gone
        self._dispatcher.retire(worker)
        if self._roster.retire(worker) and self._state is not QueueState.CLOSED:
            self._add_worker()
        self._stop_if_idle(worker)

    def _check_memory(self, worker: Worker, limit: int) -> None:
        """After a job: a serving worker above the memory limit is recycled (it finished
        the job in hand; the next go elsewhere)."""
        if self._roster.standing(worker) is Standing.SERVING:
            rss = worker.rss()
            if rss is not None and rss > limit:
                self._recycle(worker, "max_memory_per_child", limit, rss)

    def _stop_if_idle(self, worker: Worker) -> None:
        """Stop a retiring worker once it holds nothing: no job, and no open stream (a
        stream frees its slot but lives in the worker until its consumer is done)."""
        if (
            self._roster.standing(worker) is Standing.RETIRING
            and not self._dispatcher.load(worker)
            and all(w is not worker for w in self._in_flight.values())
        ):
            self._forget(worker)
            self._spawn_task(self._stop_worker(worker))

    def _forget(self, worker: Worker, error: CorralError | None = None) -> WorkerRecord | None:
        """Take worker out of the queue; broadcasts pinned to it that it never took fail.
        Returns its last record (None if it had left already)."""
        for job in self._dispatcher.remove_worker(worker):
            settle(
                job,
                None,
                error
                or WorkerLostError(
                    worker.name, detail="it left the queue before running the broadcast"
                ),
            )
        return self._roster.remove(worker)

    def _kept_serving(self) -> int:
        """How many of the source's workers serve now."""
        return len(self._roster.kept(Standing.SERVING))

    # -- a source's workers: launching, connecting, resizing -------------------------------

    def _launch(self) -> None:
        """Start the source's workers (a cluster's once connected)."""
        source = self._source
        assert source is not None
        self._started = True
        self._ready = asyncio.Event()
        if source.connects:
            self._connecting = self._spawn_task(self._connect(source))
            return
        for _ in range(source.size):
            self._add_worker()

    async def _connect(self, source: WorkerSource) -> None:
        """Connect the source (a cluster), which may size it, then start its workers. A
        scheduler out of reach breaks the queue: retrying would only wait again."""
        try:
            await source.connect()
        except WorkerStartupError as exc:
            self._give_up(exc)
            return
        finally:
            self._connecting = None
        if self._state is not QueueState.CLOSED:  # closed meanwhile: nothing to serve
            for _ in range(source.size):
                self._add_worker()

    async def _start_source(self) -> None:
        """Launch the source's workers if not yet, and wait until all serve.

        Raises ``WorkerStartupError`` when they keep failing to start."""
        self._check_open("start")
        if not self._started:
            self._launch()
        assert self._ready is not None and self._source is not None
        try:
            await self._until_connected()
            await self._wait_serving(self._source.size)
        except BaseException:  # cancelled while starting: leave nothing running
            await asyncio.shield(self.terminate())
            raise
        if self._broken is not None:
            await self.terminate()
            raise self._broken

    async def _wait_serving(self, n: int) -> None:
        """Wait until n of the source's workers serve (or the queue broke)."""
        assert self._ready is not None
        while self._kept_serving() < n and self._broken is None:
            self._ready.clear()
            await self._ready.wait()

    async def _until_connected(self) -> None:
        """Wait until the source has connected, or failed to (no cluster: at once).
        Cancelling the wait leaves the connection going; a connection given up by
        ``close`` raises ``PoolClosedError`` here."""
        connecting = self._connecting
        if connecting is not None:
            await asyncio.wait({connecting})
            if connecting.cancelled():
                raise PoolClosedError("start", self._state.value)

    async def _until_sized(self) -> None:
        """Wait until the queue knows how many workers it will have (a cluster's pool
        learns it on connecting); ``map`` sizes its chunks by it."""
        source = self._source
        if source is not None and not source.sized and self._state is QueueState.OPEN:
            if not self._started:
                self._launch()
            await self._until_connected()

    async def _resize(self, size: int) -> None:
        """Grow or shrink the source's workers to size; see ``Pool.resize``."""
        check_count("workers", size)
        self._check_open("resize")
        source = self._source
        assert source is not None
        source.sized = True  # the size asked for, not the cluster's threads
        if not self._started:
            source.size = size
            await self._start_source()
            return
        await self._until_connected()  # before it, a cluster's pool has no size yet
        if self._broken is not None:
            raise self._broken_error()
        grow = size - source.size
        source.size = size
        for _ in range(grow):
            self._add_worker()
        if grow >= 0:
            await self._wait_serving(size)
            if self._broken is not None:
                raise self._broken_error()
            return
        surplus = -grow
        starting = self._roster.kept(Standing.STARTING)[:surplus]
        for worker in starting:  # not serving yet: the cheapest to give up
            self._roster.remove(worker)
        serving = sorted(self._roster.kept(Standing.SERVING), key=self._dispatcher.load)[
            : surplus - len(starting)
        ]
        for worker in serving:
            self._roster.disown(worker)  # not the pool's any more: not replaced
            self._retire(worker)
        await asyncio.gather(*(w.kill() for w in starting), *(w.stop() for w in serving))

    # -- closing ------------------------------------------------------------------------------

    async def _stop_workers(self, *, kill: bool) -> None:
        if self._connecting is not None:
            self._connecting.cancel()  # drained (or terminating): nothing needs the cluster
        # Starting workers keep their records: their start fails, and is handled, there.
        starting = self._roster.starting()
        workers = self._roster.started()
        for worker in workers:
            self._forget(worker)
        await asyncio.gather(
            *(w.kill() for w in starting), *(self._stop_worker(w, kill=kill) for w in workers)
        )
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _stop_worker(self, worker: Worker, *, kill: bool = False) -> None:
        """Stop (or kill) a worker that served, and log its end."""
        await (worker.kill() if kill else worker.stop())
        log.worker_stopped(worker, killed=kill)

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

    def _fail_pending(self, error: BaseException) -> None:
        for job in self._dispatcher.drain():
            settle(job, None, error)

    # -- whether a job can ever run -----------------------------------------------------------

    def _servable(self, series: str | None) -> bool:
        """Whether a job of series can ever run: some attached worker serves it, or none
        is attached and one may still come."""
        workers = self._roster.all()
        if not workers:
            return self._may_gain_workers()
        return any(w.serves(series) for w in workers)

    def _may_gain_workers(self) -> bool:
        """Whether a worker may still join. A source starts its own, closing too, until it
        gives up (with none left to keep, all detached, only a resize, while open, would
        bring one); a plain queue takes new workers only while open."""
        if self._broken is not None:
            return False
        source = self._source
        if source is not None and (source.size > 0 or not source.sized):
            return True
        return self._state is QueueState.OPEN

    def _unservable_error(self, series: str | None) -> BaseException:
        if self._broken is not None:  # a pool that gave up starting its workers
            return self._broken_error()
        if not self._roster:  # closing, every worker gone
            return PoolClosedError("run this job", f"{self._state.value} with no worker left")
        return ValueError(self._unservable_message(series))

    def _unservable_message(self, series: str | None) -> str:
        served = sorted({s for w in self._roster.all() for s in w.series or ()})
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
                    settle(job, None, error)
        self._check_drained()

    def _broken_error(self) -> BaseException:
        """A fresh copy of the reason this queue cannot serve (one raised exception per
        call, so tracebacks do not pile up on a shared instance)."""
        broken = self._broken
        assert broken is not None
        error = copy.copy(broken)
        error.__cause__ = broken.__cause__
        return error

    # -- the loop -------------------------------------------------------------------------------

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
