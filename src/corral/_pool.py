"""``Pool``: a ``TaskQueue`` that keeps its own workers alive.

How a call travels, and where each step happens:

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
crash the moment it happens; the queue requeues or fails what the worker held and starts a
replacement.

A pool is a queue given a worker source (``_sources``): processes, threads, the loop, or
with ``cluster=`` ``DaskWorker``s sharing one client, whose pool connects first (in a
task, when its first call starts it; the calls wait in the heap meanwhile), counts the
cluster's threads, then starts one DaskWorker per thread. This class only builds the
source from the options and names the pool's own calls (``start``, ``resize``).
"""

from __future__ import annotations

import warnings
from typing import Any, Self

from ._sources import Kind, worker_source
from ._taskqueue import Strategy, TaskQueue
from .workers._process import STARTUP_TIMEOUT


class Pool(TaskQueue):
    """Worker processes kept alive behind a priority queue, driven by the event loop.

    Args:
        workers: how many workers; None means one per CPU this process may use (with
            ``cluster``: one per thread of the cluster, counted when the pool connects).
        kind: ``"process"`` (the default), ``"thread"`` (a thread each: for calls that
            release the GIL or wait on I/O) or ``"local"`` (in the event loop itself: for
            coroutine functions).
        start_method: ``"forkserver"`` (the default where it exists), ``"spawn"`` or
            ``"fork"``. fork is fastest to start but unsafe with threads in the parent.
        strategy: see ``TaskQueue``; the default is ``"auto"``, or ``"fair"`` with
            ``cluster``.
        prefetch: see ``TaskQueue``.
        initializer: run ``initializer(*initargs)`` in each worker before it takes jobs.
            If it raises, the pool gives up after a few tries and calls fail with
            ``WorkerStartupError``.
        initargs: the arguments of ``initializer``.
        soft_time_limit: the default for calls that set none. Past it
            ``SoftTimeLimitExceeded`` is raised inside the task (through SIGALRM). It
            counts from the moment the job starts.
        time_limit: the default for calls that set none. Past it the worker is killed and
            replaced and the call fails with ``TimeLimitExceeded``. It counts from the
            moment the job starts.
        startup_timeout: seconds a worker has to start before it is killed and retried.
        max_tasks_per_child: replace a worker after it has run this many jobs (1: a fresh
            process per job). It is never sent more; what it holds, it finishes.
        max_memory_per_child: replace a worker whose resident memory, after a job, is above
            this many bytes. The job in hand finishes first; the replacement starts at once.
        cluster: run the calls on a dask.distributed cluster: a ``distributed.Client`` made
            with ``asynchronous=True`` on the pool's event loop (shared, left open), or a
            scheduler address (``"tcp://host:8786"``), which the pool connects to when it
            starts (within ``startup_timeout``; else calls fail with
            ``WorkerStartupError``) and disconnects from when it closes. The workers are
            ``DaskWorker``s sharing that one client, and ``kind`` is ``"dask"``. Under
            ``strategy="fair"``, its default, each keeps one task on the cluster, so corral
            orders every job. ``kind``, ``start_method``, ``initializer``/``initargs``,
            ``max_tasks_per_child`` and ``max_memory_per_child`` do not apply (for state
            in the Dask workers use ``broadcast`` or Dask's worker plugins). Needs
            ``pip install 'corral[dask]'``.

    Use it as ``async with Pool() as pool:``, or call ``await pool.start()`` and later
    ``await pool.close()``. Workers of other kinds may be attached too (``attach``); the
    pool serves with them but keeps only its own alive.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        kind: Kind = "process",
        start_method: str | None = None,
        strategy: Strategy | None = None,
        prefetch: int | None = None,
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
        cluster: Any = None,
    ) -> None:
        source = worker_source(
            workers,
            kind=kind,
            cluster=cluster,
            start_method=start_method,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child,
            soft_time_limit=soft_time_limit,
            time_limit=time_limit,
            startup_timeout=startup_timeout,
        )
        if strategy is None:  # a cluster's round trip is long: corral orders every job there
            strategy = "fair" if cluster is not None else "auto"
        super().__init__(strategy=strategy, prefetch=prefetch)
        self._keep(source)
        self.kind: str = source.kind

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
        return (
            f"<corral.Pool {len(self.workers)}/{self.size} {self.kind} workers {self._state.value}>"
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    @property
    def size(self) -> int:
        """How many workers the pool keeps (0 until a cluster's threads are counted)."""
        assert self._source is not None
        return self._source.size

    @property
    def max_tasks_per_child(self) -> int | None:
        return self._quota

    @property
    def max_memory_per_child(self) -> int | None:
        return self._memory_limit

    @property
    def soft_time_limit(self) -> float | None:
        assert self._source is not None
        return self._source.soft_time_limit

    @property
    def time_limit(self) -> float | None:
        assert self._source is not None
        return self._source.time_limit

    async def start(self) -> None:
        """Start the workers and wait until all are ready.

        Raises ``WorkerStartupError`` when workers keep failing to start.
        """
        await self._start_source()

    async def resize(self, workers: int) -> None:
        """Grow or shrink the pool to ``workers`` workers, live.

        Growing returns once the new workers serve. Shrinking takes the idle workers
        first; a busy one finishes what it holds, then stops, and this returns once it
        has. No job is lost either way.
        """
        await self._resize(workers)
