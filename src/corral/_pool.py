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

With ``cluster=`` the workers are ``DaskWorker``s sharing one client (``_cluster``): the
pool connects first (in a task, when its first call starts it; the calls wait in the
heap meanwhile), counts the cluster's threads, then starts one DaskWorker per thread.
"""

from __future__ import annotations

import asyncio
import os
import signal
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Self

from ._cluster import ClusterLink
from ._errors import CorralError, PoolClosedError, WorkerLostError, WorkerStartupError
from ._queuecore import QueueState, Strategy, check_limit
from ._taskqueue import TaskQueue
from ._wire import dumps_call
from .workers._local import LocalWorker
from .workers._process import STARTUP_TIMEOUT, ProcessWorker, unguarded_main
from .workers._thread import ThreadWorker

if TYPE_CHECKING:
    from ._job import Job
    from .workers._base import Worker

Kind = Literal["process", "thread", "local"]
KINDS = ("process", "thread", "local")

# Consecutive failed start-ups after which the pool stops trying and fails calls with
# WorkerStartupError: a raising initializer fails every time, and retrying forever would
# spin; a passing fault (a slow machine, a full process table) rarely fails this often.
MAX_STARTUP_FAILURES = 3

# Starts ended by SIGKILL in a row that are retried at once without counting as failures
# (someone else's kill is no fault of the start-up): enough for chaos that kills workers in
# their first milliseconds; past it they count, so a start-up the OOM killer ends every
# time (an initializer that loads too much) backs off and gives up instead of spinning.
MAX_KILLED_STARTS = 20

# Wait before the n-th consecutive retry: BACKOFF * 2**(n-1) seconds.
BACKOFF = 0.1

# Why each option of process workers is refused with ``cluster=``, and what to do instead.
_SETUP = "set the Dask workers up with `await pool.broadcast(fn)` or a Dask worker plugin"
NOT_FOR_CLUSTER = {
    "kind": "its workers are DaskWorkers (pool.kind is 'dask')",
    "start_method": "the cluster starts its own worker processes",
    "initializer": _SETUP,
    "initargs": _SETUP,
    "max_tasks_per_child": "corral does not recycle Dask workers",
    "max_memory_per_child": "set Dask's own memory_limit on its workers",
}


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity), not merely those in the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


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
        cluster: run the calls on a dask.distributed cluster: a ``distributed.Client`` made
            with ``asynchronous=True`` on the pool's event loop (shared, left open), or a
            scheduler address (``"tcp://host:8786"``), which the pool connects to when it
            starts (within ``startup_timeout``; else calls fail with
            ``WorkerStartupError``) and disconnects from when it closes. The workers are
            ``DaskWorker``s sharing that one client, and ``kind`` is ``"dask"``. Under
            ``strategy="fair"`` each keeps one task on the cluster, so corral orders every
            job. ``kind``, ``start_method``, ``initializer``/``initargs``,
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
        strategy: Strategy = "fair",
        prefetch: int = 4,
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
        cluster: Any = None,
    ) -> None:
        if cluster is not None:
            check_cluster_options(
                {
                    "kind": kind,
                    "start_method": start_method,
                    "initializer": initializer,
                    "initargs": tuple(initargs),
                    "max_tasks_per_child": max_tasks_per_child,
                    "max_memory_per_child": max_memory_per_child,
                }
            )
            check_limit("startup_timeout", startup_timeout)
        self._count_threads = cluster is not None and workers is None
        if workers is None:
            workers = 0 if cluster is not None else cpu_count()  # 0: counted on connecting
        if not self._count_threads:
            check_size(workers)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if kind != "process":
            for name, value in (
                ("start_method", start_method),
                ("max_memory_per_child", max_memory_per_child),
            ):
                if value is not None:
                    raise ValueError(f"{name} applies to process workers, not kind={kind!r}")
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
        self.kind: str = kind if cluster is None else "dask"
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
        # Made here so a bad cluster (or a missing Dask) raises at the call.
        self._cluster = None if cluster is None else ClusterLink(cluster)
        self._connecting: asyncio.Task[None] | None = None  # until connected (or failed)
        if self._cluster is None:
            self._new_worker()  # validates the options here, at the call
        self._started = False
        self._startup_failures = 0
        self._killed_starts = 0  # starts ended by SIGKILL in a row (see MAX_KILLED_STARTS)
        self._own: set[Worker] = set()  # the workers this pool keeps alive
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
        return (
            f"<corral.Pool {len(self._workers)}/{self.size} {self.kind} workers "
            f"{self._state.value}>"
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def start(self) -> None:
        """Start the workers and wait until all are ready.

        Raises ``WorkerStartupError`` when workers keep failing to start.
        """
        self._check_open("start")
        if not self._started:
            self._launch()
        assert self._ready is not None
        try:
            await self._until_connected()
            await self._wait_serving(self.size)
        except BaseException:  # cancelled while starting: leave nothing running
            await asyncio.shield(self.terminate())
            raise
        if self._broken is not None:
            await self.terminate()
            raise self._broken

    async def _wait_serving(self, n: int) -> None:
        """Wait until n of the pool's own workers serve (or it broke)."""
        assert self._ready is not None
        while self._serving() < n and self._broken is None:
            self._ready.clear()
            await self._ready.wait()

    async def _until_connected(self) -> None:
        """Wait until the pool has connected to its cluster, or failed to (no cluster: at
        once). Cancelling the wait leaves the connection going; a connection given up by
        ``close`` raises ``PoolClosedError`` here."""
        connecting = self._connecting
        if connecting is not None:
            await asyncio.wait({connecting})
            if connecting.cancelled():
                raise PoolClosedError("start", self._state.value)

    async def _until_sized(self) -> None:
        # A cluster's pool learns its size on connecting: map sizes its chunks by it.
        if self._count_threads and self._state is QueueState.OPEN:
            if not self._started:
                self._launch()
            await self._until_connected()

    def _serving(self) -> int:
        return sum(1 for w in self._workers if w in self._own and w not in self._retiring)

    async def resize(self, workers: int) -> None:
        """Grow or shrink the pool to ``workers`` workers, live.

        Growing returns once the new workers serve. Shrinking takes the idle workers
        first; a busy one finishes what it holds, then stops, and this returns once it
        has. No job is lost either way.
        """
        check_size(workers)
        self._check_open("resize")
        self._count_threads = False  # the size asked for, not the cluster's threads
        if not self._started:
            self.size = workers
            await self.start()
            return
        await self._until_connected()  # before it, a cluster's pool has no size yet
        if self._broken is not None:
            raise self._broken_error()
        grow = workers - self.size
        self.size = workers
        for _ in range(grow):
            self._add_worker()
        if grow >= 0:
            await self._wait_serving(workers)
            if self._broken is not None:
                raise self._broken_error()
            return
        surplus = -grow
        starting = [w for w in self._starting if w in self._own][:surplus]
        for worker in starting:  # not serving yet: the cheapest to give up
            self._own.discard(worker)
        serving = sorted(
            (w for w in self._workers if w in self._own and w not in self._retiring),
            key=self._dispatcher.load,
        )[: surplus - len(starting)]
        for worker in serving:
            self._own.discard(worker)
            self._retire(worker)  # not the pool's any more: not replaced
        await asyncio.gather(*(w.kill() for w in starting), *(w.stop() for w in serving))

    def _expected_workers(self) -> int:
        return self.size

    def _admit(self, job: Job[Any]) -> None:
        # Pickled once, here, so a function or argument that will not pickle fails the
        # call that submitted it, and a requeued job is not pickled again.
        if job.time_limit is None:
            job.time_limit = self.time_limit
        if job.soft_time_limit is None:
            job.soft_time_limit = self.soft_time_limit
        if self.kind == "process":
            job.encode()
        if not self._started:
            self._launch()  # a pool used without `async with` starts on its first call

    async def broadcast(self, fn: Callable[..., Any], /, *args: Any) -> list[Any]:
        self._check_open("broadcast")  # before starting anything for it
        if not self._started or self._connecting is not None or self._serving() < self.size:
            await self.start()  # every worker of the pool takes part
        return await super().broadcast(fn, *args)

    broadcast.__doc__ = TaskQueue.broadcast.__doc__

    def _check_broadcast(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self.kind == "process":
            dumps_call(fn, args)  # raises SerializationError here, at the call

    def _launch(self) -> None:
        self._started = True
        self._ready = asyncio.Event()
        if self._cluster is not None:
            self._connecting = self._spawn_task(self._connect(self._cluster))
            return
        for _ in range(self.size):
            self._add_worker()

    async def _connect(self, cluster: ClusterLink) -> None:
        """Connect to the cluster, size the pool to its threads if asked, start the workers.
        A scheduler out of reach breaks the pool: retrying would only wait again."""
        try:
            threads = await cluster.connect(self._worker_options["startup_timeout"])
        except WorkerStartupError as exc:
            self._give_up(exc)
            return
        finally:
            self._connecting = None
        if self._count_threads:
            self.size = threads
        if self._state is not QueueState.CLOSED:  # closed meanwhile: nothing to serve
            for _ in range(self.size):
                self._add_worker()

    async def _stop_workers(self, *, kill: bool) -> None:
        if self._connecting is not None:
            self._connecting.cancel()  # drained (or terminating): nothing needs the cluster
        await super()._stop_workers(kill=kill)

    async def close(self) -> None:
        await super().close()
        if self._cluster is not None:
            await self._cluster.close()  # after the workers that used its client

    close.__doc__ = TaskQueue.close.__doc__

    async def terminate(self) -> None:
        await super().terminate()
        if self._cluster is not None:
            await self._cluster.close()

    terminate.__doc__ = TaskQueue.terminate.__doc__

    # -- keeping workers alive ------------------------------------------------------------

    def _new_worker(self) -> Worker:
        if self._cluster is not None:
            return self._cluster.new_worker()
        options = self._worker_options
        if self.kind == "process":
            return ProcessWorker(**options)
        cls = ThreadWorker if self.kind == "thread" else LocalWorker
        return cls(initializer=options["initializer"], initargs=options["initargs"])

    def _add_worker(self) -> None:
        worker = self._new_worker()
        self._own.add(worker)
        self._starting.add(worker)
        self._spawn_task(self._start_worker(worker))

    def _may_gain_workers(self) -> bool:
        # It starts its own, closing too, until it gives up; with none left to keep (all
        # detached), only a resize, while open, would bring one.
        if self._broken is not None:
            return False
        return self.size > 0 or self._count_threads or self._state is QueueState.OPEN

    def _quota(self) -> int | None:
        return self.max_tasks_per_child

    def _worker_ready(self, worker: Worker) -> None:
        self._startup_failures = self._killed_starts = 0
        if self._ready is not None:
            self._ready.set()

    def _startup_failed(self, worker: Worker, exc: CorralError) -> None:
        if worker not in self._own:
            super()._startup_failed(worker, exc)  # attached by the caller: theirs to handle
            return
        self._own.discard(worker)
        if self._state.value != "closed" and _killed_from_outside(exc):
            # SIGKILL is no fault of the worker's start-up (another process sent it, or the
            # OOM killer): the next start may well succeed, so it is not counted towards
            # giving up, unless it keeps happening (see MAX_KILLED_STARTS).
            self._killed_starts += 1
            if self._killed_starts < MAX_KILLED_STARTS:
                self._add_worker()
                return
        if isinstance(exc, WorkerLostError):
            exc = WorkerStartupError(1, f"{worker.name} died while starting: {exc}")
        if isinstance(exc, WorkerStartupError) and unguarded_main(exc):
            self._give_up(exc)  # every worker would fail the same way: no retry
            return
        assert isinstance(exc, WorkerStartupError)
        self._startup_failures += 1
        n = self._startup_failures
        if n >= MAX_STARTUP_FAILURES:
            broken = WorkerStartupError(n, exc.reason)
            broken.__cause__ = exc.__cause__ or exc
            self._give_up(broken)
            return
        if self._state.value != "closed":
            self._spawn_task(self._retry_after(BACKOFF * 2 ** (n - 1)))

    def _give_up(self, broken: WorkerStartupError) -> None:
        """No worker will start: fail the waiting calls (and later ones) with broken."""
        self._broken = broken
        self._fail_pending(broken)
        if self._ready is not None:
            self._ready.set()
        self._check_drained()

    async def _retry_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._state.value != "closed" and self._broken is None:
            self._add_worker()

    # -- recycling --------------------------------------------------------------------------

    def _after_send(self, worker: Worker) -> None:
        # Retired at its quota's last send, not its last result, so that under prefetch a
        # worker is never sent more than its quota.
        if (
            self.max_tasks_per_child is not None
            and self._dispatcher.quota_left(worker) == 0
            and worker not in self._retiring
        ):
            self._retire(worker)

    def _after_job(self, worker: Worker) -> None:
        limit = self.max_memory_per_child
        if limit is not None and worker in self._workers and worker not in self._retiring:
            rss = worker.rss()
            if rss is not None and rss > limit:
                self._retire(worker)  # it finished the job in hand; the next go elsewhere

    def _worker_retired(self, worker: Worker) -> None:
        if self._state.value != "closed" and worker in self._own:
            self._own.discard(worker)
            self._add_worker()

    def _worker_detached(self, worker: Worker) -> None:
        if worker in self._own:  # the pool shrinks by the one taken from it
            self._own.discard(worker)
            self.size -= 1

    def _worker_gone(self, worker: Worker, error: CorralError) -> None:
        if worker not in self._own:
            super()._worker_gone(worker, error)
            return
        self._own.discard(worker)
        if self._state.value == "closed" or self._broken is not None:
            return
        if self.closed and not (self._dispatcher or self._in_flight):
            self._check_drained()
            return
        self._add_worker()


def _killed_from_outside(exc: CorralError) -> bool:
    """Whether a failed start was a worker process SIGKILLed while starting (not a broadcast
    it was replaying: one that kills every worker must still stop the pool retrying)."""
    cause = exc.__cause__
    return (
        isinstance(exc, WorkerStartupError)
        and isinstance(cause, WorkerLostError)
        and cause.signal == signal.SIGKILL
    )


def check_cluster_options(options: dict[str, Any]) -> None:
    """With ``cluster=`` the workers are DaskWorkers: the options of processes do not apply."""
    defaults: dict[str, Any] = {"kind": "process", "initargs": ()}
    for name, value in options.items():
        if value != defaults.get(name) and (name, value) != ("kind", "dask"):
            raise ValueError(
                f"{name}={value!r} does not apply with cluster=: {NOT_FOR_CLUSTER[name]}"
            )


def check_size(workers: object) -> None:
    """A pool's size is a positive int."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive int or None, not {workers!r}")
