"""``Pool``: a ``TaskQueue`` whose worker processes it starts, watches and replaces.

How a call travels, and where each step happens::

    pool.submit(fn, x)                         the caller's task
      | pickle (fn, x) once -> Job               SerializationError raised right here
      v
    Dispatcher (priority heap)                 pure decision: which worker, and when
      | fair: idle worker / prefetch: < n in flight
      v
    ProcessWorker.send -> LoopWriter           written at once to an idle pipe; a burst
      |   pipe (1 MiB)                         goes out in one writev; add_writer when full
      |   (large bytes: shared memfd region)   one copy in, one copy out
      v
    child: unpickle -> ack -> fn(x) -> RESULT  the ack is a store to a shared page, no
      |   pipe                                 message (an ACK frame only for hard limits)
      v
    LoopReader (add_reader) -> FrameDecoder    big bodies read in place, no copy
      v
    TaskQueue.job_done -> next job to worker   the slot is refilled before the caller wakes
      -> job.future.set_result                 the awaiting task resumes

A death fd per worker (a pidfd, or the forkserver's status pipe) on the same loop reports a
crash the moment it happens; the queue requeues or fails what the worker held and the pool
starts a replacement.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from typing import TYPE_CHECKING, Any, Self

from ._errors import CorralError, WorkerStartupError
from ._taskqueue import Strategy, TaskQueue, check_limit
from .workers._process import STARTUP_TIMEOUT, ProcessWorker

if TYPE_CHECKING:
    from ._job import Job
    from .workers._base import Worker

# Consecutive failed start-ups after which the pool stops trying and fails calls with
# WorkerStartupError: a raising initializer fails every time, and retrying forever would
# spin; a passing fault (a slow machine, a full process table) rarely fails this often.
MAX_STARTUP_FAILURES = 3

# Wait before the n-th consecutive retry: BACKOFF * 2**(n-1) seconds.
BACKOFF = 0.1


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity), not merely those in the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Pool(TaskQueue):
    """Worker processes kept alive behind a priority queue, driven by the event loop.

    Args:
        workers: how many processes; None means one per CPU this process may use.
        start_method: ``"forkserver"`` (the default where it exists), ``"spawn"`` or
            ``"fork"``. fork is fastest to start but unsafe with threads in the parent.
        strategy, prefetch: see ``TaskQueue``.
        initializer, initargs: run ``initializer(*initargs)`` in each worker before it takes
            jobs. If it raises, the pool gives up after a few tries and calls fail with
            ``WorkerStartupError``.
        soft_time_limit, time_limit: defaults for calls that set none. Past the soft limit
            ``SoftTimeLimitExceeded`` is raised inside the task (through SIGALRM); past the
            hard limit the worker is killed and replaced and the call fails with
            ``TimeLimitExceeded``. Both count from the moment the job starts.
        startup_timeout: seconds a worker has to start before it is killed and retried.
        max_tasks_per_child: replace a worker after it has run this many jobs (1: a fresh
            process per job). It is never sent more; what it holds, it finishes.
        max_memory_per_child: replace a worker whose resident memory, after a job, is above
            this many bytes. The job in hand finishes first; the replacement starts at once.

    Use it as ``async with Pool() as pool:``, or call ``await pool.start()`` and later
    ``await pool.close()``.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        start_method: str | None = None,
        strategy: Strategy = "fair",
        prefetch: int = 4,
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        if workers is None:
            workers = cpu_count()
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be a positive int or None, not {workers!r}")
        super().__init__(strategy=strategy, prefetch=prefetch)
        check_limit("soft_time_limit", soft_time_limit)
        check_limit("time_limit", time_limit)
        for name, value in (
            ("max_tasks_per_child", max_tasks_per_child),
            ("max_memory_per_child", max_memory_per_child),
        ):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, not {value!r}")
        self.max_tasks_per_child = max_tasks_per_child
        self.max_memory_per_child = max_memory_per_child
        self.size = workers
        self.soft_time_limit = soft_time_limit
        self.time_limit = time_limit
        self._worker_options: dict[str, Any] = {
            "start_method": start_method,
            "initializer": initializer,
            "initargs": tuple(initargs),
            "startup_timeout": startup_timeout,
        }
        ProcessWorker(**self._worker_options)  # validates the options here, at the call
        self._started = False
        self._startup_failures = 0
        self._starting: set[Worker] = set()
        self._ready: asyncio.Event | None = None

    def __del__(self, _warn: Any = warnings.warn) -> None:
        # getattr: __init__ may have raised before setting it (a bad option).
        if getattr(self, "_started", False) and self._state.value != "closed":
            _warn(
                f"{self!r} was never closed: use `async with Pool()` or `await pool.close()`",
                ResourceWarning,
                source=self,
                stacklevel=2,
            )
            # Its ProcessWorkers kill their processes when they are collected.

    def __repr__(self) -> str:
        return f"<corral.Pool {len(self._workers)}/{self.size} workers {self._state.value}>"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def start(self) -> None:
        """Start the workers and wait until all are ready.

        Raises ``WorkerStartupError`` when workers keep failing to start.
        """
        self._bind_loop()
        self._check_open("start")
        if not self._started:
            self._launch()
        assert self._ready is not None
        try:
            while len(self._workers) < self.size and self._broken is None:
                self._ready.clear()
                await self._ready.wait()
        except BaseException:  # cancelled while starting: leave nothing running
            await asyncio.shield(self.terminate())
            raise
        if self._broken is not None:
            await self.terminate()
            raise self._broken

    def _expected_workers(self) -> int:
        return self.size

    def _admit(self, job: Job[Any]) -> None:
        # Pickled once, here, so a function or argument that will not pickle fails the
        # call that submitted it, and a requeued job is not pickled again.
        if job.time_limit is None:
            job.time_limit = self.time_limit
        if job.soft_time_limit is None:
            job.soft_time_limit = self.soft_time_limit
        job.encode()
        if not self._started:
            self._launch()  # a pool used without `async with` starts on its first call

    def _launch(self) -> None:
        self._started = True
        self._ready = asyncio.Event()
        for _ in range(self.size):
            self._add_process()

    # -- keeping workers alive ------------------------------------------------------------

    def _add_process(self) -> None:
        worker = ProcessWorker(**self._worker_options)
        self._starting.add(worker)
        self._spawn_task(self._start_worker(worker))

    async def _start_worker(self, worker: Worker) -> None:
        try:
            await worker.start(self)
        except WorkerStartupError as exc:
            self._starting.discard(worker)
            self._startup_failed(exc)
            return
        self._starting.discard(worker)
        self._startup_failures = 0
        if self.closed and not (self._dispatcher or self._in_flight):
            await worker.stop()
            return
        self._workers[worker] = None
        self._dispatch(
            self._dispatcher.add_worker(
                worker, self._capacity, worker.series, quota=self.max_tasks_per_child
            )
        )
        if self._ready is not None:
            self._ready.set()

    def _startup_failed(self, exc: WorkerStartupError) -> None:
        self._startup_failures += 1
        n = self._startup_failures
        if n >= MAX_STARTUP_FAILURES:
            broken = WorkerStartupError(n, exc.reason)
            broken.__cause__ = exc.__cause__ or exc
            self._broken = broken
            self._fail_pending(broken)
            if self._ready is not None:
                self._ready.set()
            self._check_drained()
            return
        if self._state.value != "closed":
            self._spawn_task(self._retry_after(BACKOFF * 2 ** (n - 1)))

    async def _retry_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._state.value != "closed" and self._broken is None:
            self._add_process()

    # -- recycling --------------------------------------------------------------------------

    def _after_send(self, worker: Worker) -> None:
        # Retired at its quota's last send, not its last result, so that under prefetch a
        # worker is never sent more than its quota.
        limit = self.max_tasks_per_child
        if limit is not None and worker.tasks_sent >= limit and worker not in self._retiring:
            self._retire(worker)

    def _after_job(self, worker: Worker) -> None:
        limit = self.max_memory_per_child
        if limit is not None and worker not in self._retiring:
            rss = getattr(worker, "rss", lambda: None)()
            if rss is not None and rss > limit:
                self._retire(worker)  # it finished the job in hand; the next go elsewhere

    def _worker_retired(self, worker: Worker) -> None:
        if self._state.value != "closed":
            self._add_process()

    def _worker_gone(self, worker: Worker, error: CorralError) -> None:
        if self._state.value == "closed" or self._broken is not None:
            return
        if self.closed and not (self._dispatcher or self._in_flight):
            self._check_drained()
            return
        self._add_process()

    async def _stop_workers(self, *, kill: bool) -> None:
        starting = list(self._starting)
        self._starting.clear()
        await asyncio.gather(*(w.kill() for w in starting))
        await super()._stop_workers(kill=kill)
