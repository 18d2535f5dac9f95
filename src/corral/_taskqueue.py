"""``TaskQueue``: calls in, workers of any kind out.

The queue takes calls (``submit``, ``run``, ``map``, ``imap``, ``iterate``, ``broadcast``),
keeps them in priority order and hands them to the workers attached to it; the rules it
serves them by are ``QueueCore``'s. ``Pool`` adds keeping its own workers alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Iterable
from time import perf_counter
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple, Unpack

from ._errors import PoolClosedError, WorkerLostError
from ._job import Job, JobState
from ._mapping import MapIterator, imap_items, map_list
from ._queuecore import QueueCore, QueueState, check_limit
from ._stats import Percentiles, QueueStats, parent_rss, worker_stats
from ._stream import WINDOW, ItemStream, StreamIterator

if TYPE_CHECKING:
    from .workers._base import Worker

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class TaskQueue(QueueCore):
    """A priority queue of calls served by the workers attached to it.

    Args:
        strategy: ``"fair"`` hands a job only to an idle worker; ``"prefetch"`` keeps up to
            ``prefetch`` jobs in flight per worker, which saves a round trip per job when
            jobs are short and similar; ``"auto"`` decides per worker after each job:
            one at a time after a job of 2 ms or more, else as many as keep about 2 ms of
            work queued (at most ``prefetch``). Under prefetch and auto a job queued in a
            worker behind a call that turns out long waits for that call.
        prefetch: jobs in flight per worker under ``"prefetch"``; the most under
            ``"auto"``.
    """

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
        """Start worker and let it serve this queue; returns the task that starts it.

        Awaiting the task is optional: it ends once the worker serves (after replaying
        every ``broadcast``), or raises ``WorkerStartupError`` if it could not start.
        """
        self._check_open("attach a worker")
        if worker in self._workers or worker in self._starting:
            raise ValueError(f"{worker!r} is already attached to this queue")
        if worker.alive or worker.tasks_sent:
            raise ValueError(f"{worker!r} has been started already; attach a new worker")
        self._starting.add(worker)
        return self._spawn_task(self._start_worker(worker))

    async def detach(self, worker: Worker) -> None:
        """Give worker no more jobs, let it finish those it holds, then stop it. A job it
        could not finish (it died) is handed back to the queue, or fails if it had started.
        """
        self._bind_loop("detach a worker")
        if worker not in self._workers:
            raise ValueError(f"{worker!r} is not attached to this queue")
        self._forget(worker)
        self._worker_detached(worker)
        self._check_servable()
        await worker.stop()

    async def close(self) -> None:
        """Run every queued and running job to its end, then stop the workers. Idempotent.

        Queued jobs that no worker left can take (none is attached, or their series is
        served by none) fail with ``PoolClosedError`` or ``ValueError``: closing, the
        queue takes no new worker that could run them."""
        self._bind_loop("close")  # from another loop it could only hang
        if self._state is QueueState.CLOSED:
            return
        self._state = QueueState.CLOSING
        self._check_servable()  # no worker may join now: jobs none left can take fail
        await self._wait_drained()
        self._state = QueueState.CLOSED
        await self._stop_workers(kill=False)

    async def terminate(self) -> None:
        """Kill the workers now; every unfinished job is cancelled. Idempotent."""
        self._bind_loop("terminate")
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
    ) -> Job[T]:
        loop = self._check_call(series, retries)
        if not callable(fn):
            raise TypeError(f"the function to run must be callable, not {fn!r}")
        check_limit("time_limit", time_limit)
        check_limit("soft_time_limit", soft_time_limit)
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
        job.stream = stream
        self._admit(job)
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
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int of 0 or more, not {retries!r}")
        return loop

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
        if not isinstance(window, int) or isinstance(window, bool) or window < 2:
            raise ValueError(f"window must be an int of at least 2, not {window!r}")
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
        return await map_list(
            self, fn, iterable, chunksize=chunksize, options=options, progress=progress
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
        progress bar with rate and ETA when stderr is a terminal; ``"always"`` shows it
        anyway.
        """
        self._check_call(series, retries, "imap")  # here, not at the first item
        options = {"priority": priority, "series": series, "retries": retries}
        return imap_items(
            self,
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
        self._check_broadcast(fn, args)
        record = (fn, args)
        self._broadcasts.append(record)  # workers starting from now on replay it
        jobs = []
        for worker in self._workers:
            if worker in self._retiring:
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
        for worker in [*self._workers, *self._starting]:
            load = self._dispatcher.load(worker)
            if worker in self._starting:
                state = "starting"
            elif worker in self._retiring:
                state = "retiring"
            else:
                state = "busy" if load else "idle"
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
