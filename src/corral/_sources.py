"""Worker sources: where a queue's own workers come from, and what to do when one fails.

A ``TaskQueue`` serves with the workers attached to it. Given a source (a ``Pool`` is a
queue with one) it also keeps that source's workers alive, asking the source: a new
worker to start; how many to keep; what each call needs before it is queued (the pool's
default time limits, its pickle for a process); whether a worker is recycled after so
many jobs or above so much memory; and, when a start fails, whether to retry at once,
after a back-off, or give up. The queue carries the answers out; a source starts nothing
and waits on nothing, except a cluster's, which connects to its scheduler.

Each kind validates its own options when it is made, so a bad one is refused at
``Pool(...)``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ._checks import check_count, check_seconds
from ._errors import CorralError, WorkerLostError, WorkerStartupError
from ._wire import dumps_call
from .workers._process import STARTUP_TIMEOUT, ProcessWorker, unguarded_main

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


@dataclass(frozen=True, slots=True)
class Retry:
    """Start a replacement after delay seconds (0: at once)."""

    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No worker will start: calls fail with error from now on."""

    error: WorkerStartupError


class Restarts:
    """What to do after each failed start: the count of failures in a row decides."""

    def __init__(self) -> None:
        self.failures = 0
        self.killed = 0  # starts ended by SIGKILL in a row (see MAX_KILLED_STARTS)

    def succeeded(self) -> None:
        self.failures = self.killed = 0

    def failed(self, worker: Worker, exc: CorralError) -> Retry | GiveUp:
        if _killed_from_outside(exc):
            # SIGKILL is no fault of the worker's start-up (another process sent it, or the
            # OOM killer): the next start may well succeed, so it is not counted towards
            # giving up, unless it keeps happening.
            self.killed += 1
            if self.killed < MAX_KILLED_STARTS:
                return Retry(0)
        if isinstance(exc, WorkerLostError):
            exc = WorkerStartupError(1, f"{worker.name} died while starting: {exc}")
        assert isinstance(exc, WorkerStartupError)
        if unguarded_main(exc):
            return GiveUp(exc)  # every worker would fail the same way: no retry
        self.failures += 1
        n = self.failures
        if n >= MAX_STARTUP_FAILURES:
            broken = WorkerStartupError(n, exc.reason)
            broken.__cause__ = exc.__cause__ or exc
            return GiveUp(broken)
        return Retry(BACKOFF * 2 ** (n - 1))


class WorkerSource:
    """Makes a queue's own workers; see the module docstring. One subclass per kind."""

    kind = ""
    connects = False  # whether ``connect`` must be awaited before the first worker starts
    sized = True  # False until a cluster's source has counted the cluster's threads

    def __init__(
        self,
        size: int,
        *,
        soft_time_limit: float | None,
        time_limit: float | None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        check_seconds("soft_time_limit", soft_time_limit)
        check_seconds("time_limit", time_limit)
        check_count("max_tasks_per_child", max_tasks_per_child, optional=True)
        check_count("max_memory_per_child", max_memory_per_child, optional=True)
        self.size = size
        self.soft_time_limit = soft_time_limit
        self.time_limit = time_limit
        self.max_tasks_per_child = max_tasks_per_child
        self.max_memory_per_child = max_memory_per_child
        self.startup_timeout = startup_timeout
        self.restarts = Restarts()

    def new_worker(self) -> Worker:
        raise NotImplementedError

    def prepare(self, job: Job[Any]) -> None:
        """Before job is queued: the source's default time limits."""
        if job.time_limit is None:
            job.time_limit = self.time_limit
        if job.soft_time_limit is None:
            job.soft_time_limit = self.soft_time_limit

    def check_broadcast(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Raise here, at the call, what a broadcast would fail with in every worker."""

    async def connect(self) -> None:
        """Reach what the workers run on (a cluster) and learn the size if not given."""

    async def close(self) -> None:
        """Let go of what ``connect`` reached, after the workers have stopped."""


class ProcessSource(WorkerSource):
    """Worker processes (``ProcessWorker``); calls are pickled once, when submitted."""

    kind = "process"

    def __init__(
        self,
        size: int,
        *,
        start_method: str | None,
        initializer: Any,
        initargs: tuple[Any, ...],
        **limits: Any,
    ) -> None:
        super().__init__(size, **limits)
        self._options: dict[str, Any] = {
            "start_method": start_method,
            "initializer": initializer,
            "initargs": initargs,
            "startup_timeout": self.startup_timeout,
        }
        self.new_worker()  # validates the workers' options here, at the call

    def new_worker(self) -> Worker:
        return ProcessWorker(**self._options)

    def prepare(self, job: Job[Any]) -> None:
        # Pickled once, here, so a function or argument that will not pickle fails the
        # call that submitted it, and a requeued job is not pickled again.
        super().prepare(job)
        job.encode()

    def check_broadcast(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        dumps_call(fn, args)  # raises SerializationError here, at the call


class ThreadSource(WorkerSource):
    """A thread each (``ThreadWorker``)."""

    kind = "thread"

    def __init__(
        self, size: int, *, initializer: Any, initargs: tuple[Any, ...], **limits: Any
    ) -> None:
        super().__init__(size, **limits)
        self._initializer = (initializer, initargs)
        self.new_worker()  # validates the initializer here, at the call

    def new_worker(self) -> Worker:
        # The other kinds of worker load with their first source: a pool of processes
        # never pays for them (nor for Dask's side, below).
        from .workers._thread import ThreadWorker  # noqa: PLC0415

        initializer, initargs = self._initializer
        return ThreadWorker(initializer=initializer, initargs=initargs)


class LocalSource(ThreadSource):
    """Workers in the event loop itself (``LocalWorker``)."""

    kind = "local"

    def new_worker(self) -> Worker:
        from .workers._local import LocalWorker  # noqa: PLC0415

        initializer, initargs = self._initializer
        return LocalWorker(initializer=initializer, initargs=initargs)


class ClusterSource(WorkerSource):
    """``DaskWorker``s sharing one client of a dask.distributed cluster (``ClusterLink``);
    with no size given, one per thread of the cluster, counted on connecting."""

    kind = "dask"
    connects = True

    def __init__(self, size: int | None, *, cluster: Any, **limits: Any) -> None:
        super().__init__(size or 0, **limits)
        check_seconds("startup_timeout", self.startup_timeout)
        self.sized = size is not None
        from ._cluster import ClusterLink  # noqa: PLC0415

        self.link = ClusterLink(cluster)  # made here, so a bad cluster raises at the call

    def new_worker(self) -> Worker:
        return self.link.new_worker()

    async def connect(self) -> None:
        """Raises ``WorkerStartupError`` when the scheduler is out of reach."""
        threads = await self.link.connect(self.startup_timeout)
        if not self.sized:
            self.size = threads
            self.sized = True

    async def close(self) -> None:
        await self.link.close()


def worker_source(
    workers: int | None,
    *,
    kind: str,
    cluster: Any,
    start_method: str | None,
    initializer: Any,
    initargs: tuple[Any, ...],
    max_tasks_per_child: int | None,
    max_memory_per_child: int | None,
    soft_time_limit: float | None,
    time_limit: float | None,
    startup_timeout: float,
) -> WorkerSource:
    """The source of a ``Pool`` with these options (see ``Pool``), each option checked."""
    check_count("workers", workers, optional=True)
    limits: dict[str, Any] = {
        "soft_time_limit": soft_time_limit,
        "time_limit": time_limit,
        "startup_timeout": startup_timeout,
    }
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
        return ClusterSource(workers, cluster=cluster, **limits)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    size = cpu_count() if workers is None else workers
    limits["max_tasks_per_child"] = max_tasks_per_child
    if kind == "process":
        return ProcessSource(
            size,
            start_method=start_method,
            initializer=initializer,
            initargs=tuple(initargs),
            max_memory_per_child=max_memory_per_child,
            **limits,
        )
    for name, value in (
        ("start_method", start_method),
        ("max_memory_per_child", max_memory_per_child),
    ):
        if value is not None:
            raise ValueError(f"{name} applies to process workers, not kind={kind!r}")
    cls = ThreadSource if kind == "thread" else LocalSource
    return cls(size, initializer=initializer, initargs=tuple(initargs), **limits)


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity), not merely those in the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_cluster_options(options: dict[str, Any]) -> None:
    """With ``cluster=`` the workers are DaskWorkers: the options of processes do not apply."""
    defaults: dict[str, Any] = {"kind": "process", "initargs": ()}
    for name, value in options.items():
        if value != defaults.get(name) and (name, value) != ("kind", "dask"):
            raise ValueError(
                f"{name}={value!r} does not apply with cluster=: {NOT_FOR_CLUSTER[name]}"
            )


def _killed_from_outside(exc: CorralError) -> bool:
    """Whether a failed start was a worker process SIGKILLed while starting (not a broadcast
    it was replaying: one that kills every worker must still stop the pool retrying)."""
    cause = exc.__cause__
    return (
        isinstance(exc, WorkerStartupError)
        and isinstance(cause, WorkerLostError)
        and cause.signal == signal.SIGKILL
    )
