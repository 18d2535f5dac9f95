"""One adapter per pool library, so that every measurement is written once.

Each adapter drives its library the way that library is meant to be used: corral,
aiomultiprocess and ProcessPoolExecutor (through ``loop.run_in_executor``) are awaited in
an asyncio loop; the others block. All methods are ``async`` so one measurement function
serves both; a blocking library's method simply never yields, which costs well under a
microsecond per call. Every pool gets 2 workers and keeps its library's default start
method and chunking.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ._adapter import WORKERS, Adapter, AsyncAdapter, AsyncResultAdapter, FutureAdapter

# -- the libraries ----------------------------------------------------------------------


class Corral(AsyncAdapter):
    """corral with its defaults: forkserver, fair dispatch."""

    key = "corral"
    title = "corral"
    module = "corral"
    dist = "corral"
    time_limits = True
    has_imap = True
    runs_coroutines = True
    options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def version(cls) -> str:
        if cls.revision is None:
            return super().version()
        import corral  # from the revision's checkout, which the report should show

        return f"{corral.__version__} at {cls.revision}, from {Path(corral.__file__).parent}"

    async def start(self, workers: int = WORKERS) -> None:
        import corral

        self.pool = corral.Pool(workers, **self.options)
        await self.pool.start()

    async def stop(self) -> None:
        await self.pool.terminate()

    @property
    def start_method(self) -> str:
        workers = self.pool.workers
        return str(getattr(workers[0], "start_method", "?")) if workers else "?"

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.pool.run(fn, *args)

    async def call_many(
        self, fn: Callable[..., Any], arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        jobs = [self.pool.submit(fn, *args) for args in arglists]
        return list(await asyncio.gather(*jobs))

    async def run_many(
        self, fn: Callable[..., Any], arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        return list(await asyncio.gather(*(self.pool.run(fn, *args) for args in arglists)))

    async def map(self, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        return await self.pool.map(fn, items)

    async def imap(
        self, fn: Callable[..., Any], items: Sequence[Any], *, ordered: bool
    ) -> list[Any]:
        return [y async for y in self.pool.imap(fn, items, ordered=ordered)]

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(fn, *args).future

    def submit_limited(self, fn: Callable[..., Any], *args: Any, limit: float) -> Any:
        return self.pool.submit(fn, *args, time_limit=limit).future


class CorralPrefetch(Corral):
    """corral with ``strategy="prefetch"`` (4 jobs in flight per worker): not run by default."""

    key = "corral-prefetch"
    title = "corral prefetch"
    options: ClassVar[dict[str, Any]] = {"strategy": "prefetch", "prefetch": 4}


class CorralFair(Corral):
    """corral with ``strategy="fair"`` named, whatever the default: not run by default."""

    key = "corral-fair"
    title = "corral fair"
    options: ClassVar[dict[str, Any]] = {"strategy": "fair"}


class CorralAuto(Corral):
    """corral with ``strategy="auto"``: not run by default."""

    key = "corral-auto"
    title = "corral auto"
    options: ClassVar[dict[str, Any]] = {"strategy": "auto"}


class ProcessPoolExecutor(AsyncAdapter):
    """The standard library's executor, awaited through ``loop.run_in_executor``.

    It has no asynchronous map, so ``map`` is the executor's blocking ``map`` (chunksize 1).
    """

    key = "ppe"
    title = "ProcessPoolExecutor"
    module = "concurrent.futures"
    dist = None
    breaks_on_death = True
    recovery = "created a new ProcessPoolExecutor"

    async def start(self, workers: int = WORKERS) -> None:
        from concurrent.futures import ProcessPoolExecutor as Executor

        self.workers = workers
        self.executor = Executor(workers)
        self.broken: list[Any] = []

    async def stop(self) -> None:
        for executor in [*self.broken, self.executor]:
            executor.shutdown(wait=True, cancel_futures=True)

    @property
    def start_method(self) -> str:
        context = self.executor._mp_context or multiprocessing.get_context()
        return str(context.get_start_method())

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def call_many(
        self, fn: Callable[..., Any], arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self.executor, fn, *args) for args in arglists]
        return list(await asyncio.gather(*futures))

    async def map(self, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        return list(self.executor.map(fn, items))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def recover(self) -> None:
        from concurrent.futures import ProcessPoolExecutor as Executor

        self.broken.append(self.executor)
        self.executor = Executor(self.workers)


class MultiprocessingPool(AsyncResultAdapter):
    """``multiprocessing.Pool``: it replaces a dead worker but never answers for its task."""

    key = "mp"
    title = "multiprocessing.Pool"
    module = "multiprocessing"
    dist = None

    async def start(self, workers: int = WORKERS) -> None:
        self.pool = multiprocessing.Pool(workers)

    async def stop(self) -> None:
        self.pool.terminate()
        self.pool.join()

    @property
    def start_method(self) -> str:
        context = getattr(self.pool, "_ctx", multiprocessing.get_context())
        return str(context.get_start_method())


class Pebble(FutureAdapter):
    """pebble's ``ProcessPool``: a dead worker fails its task with ProcessExpired.

    A call's ``timeout`` is a hard time limit: the future fails with ``TimeoutError`` and
    the worker is stopped and replaced.
    """

    key = "pebble"
    title = "pebble"
    module = "pebble"
    dist = "pebble"
    time_limits = True

    async def start(self, workers: int = WORKERS) -> None:
        from pebble import ProcessPool

        self.pool: Any = ProcessPool(max_workers=workers)

    async def stop(self) -> None:
        self.pool.stop()
        self.pool.join(timeout=5)

    @property
    def start_method(self) -> str:
        return str(self.pool._pool_manager.worker_manager.mp_context.get_start_method())

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(fn, None, *args).result()

    async def call_many(
        self, fn: Callable[..., Any], arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        futures = [self.pool.submit(fn, None, *args) for args in arglists]
        return [future.result() for future in futures]

    async def map(self, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        return list(self.pool.map(fn, items).result())

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(fn, None, *args)

    def submit_limited(self, fn: Callable[..., Any], *args: Any, limit: float) -> Any:
        return self.pool.schedule(fn, args=args, timeout=limit)


class Loky(FutureAdapter):
    """loky's reusable executor: a dead worker breaks it; asking again gives a new one."""

    key = "loky"
    title = "loky"
    module = "loky"
    dist = "loky"
    breaks_on_death = True
    recovery = "get_reusable_executor() made a new executor"

    async def start(self, workers: int = WORKERS) -> None:
        from loky import get_reusable_executor  # type: ignore[import-untyped]

        self.workers = workers
        self.executor = get_reusable_executor(max_workers=workers)

    async def stop(self) -> None:
        self.executor.shutdown(wait=False, kill_workers=True)

    @property
    def start_method(self) -> str:
        return str(self.executor._context.get_start_method())

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.executor.submit(fn, *args).result()

    async def call_many(
        self, fn: Callable[..., Any], arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        futures = [self.executor.submit(fn, *args) for args in arglists]
        return [future.result() for future in futures]

    async def map(self, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        return list(self.executor.map(fn, items))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.executor.submit(fn, *args)

    async def recover(self) -> None:
        from loky import get_reusable_executor

        self.executor = get_reusable_executor(max_workers=self.workers)


class Mpire(AsyncResultAdapter):
    """mpire's ``WorkerPool``: a dead worker breaks it, and later calls hang; make a new one.

    One departure from its defaults: ``keep_alive=True``. Without it every ``map`` starts
    its workers afresh, and the measurements compare warm pools.
    """

    key = "mpire"
    title = "mpire"
    module = "mpire"
    dist = "mpire"
    breaks_on_death = True
    recovery = "created a new WorkerPool (the broken one hangs on later calls)"

    async def start(self, workers: int = WORKERS) -> None:
        from mpire.pool import WorkerPool

        self.workers = workers
        self.pool = WorkerPool(n_jobs=workers, keep_alive=True)
        self.broken: list[Any] = []

    async def stop(self) -> None:
        for pool in [*self.broken, self.pool]:
            pool.terminate()

    @property
    def start_method(self) -> str:
        return str(self.pool.pool_params.start_method)

    async def recover(self) -> None:
        from mpire.pool import WorkerPool

        self.broken.append(self.pool)
        self.pool = WorkerPool(n_jobs=self.workers, keep_alive=True)


class AioMultiprocess(AsyncAdapter):
    """aiomultiprocess's ``Pool``: it runs coroutine functions, so each task's async twin.

    Its defaults let each child run 16 tasks at once; the tasks block, so they run one by
    one, but a child still takes up to 16 from its queue.
    """

    key = "aiomultiprocess"
    title = "aiomultiprocess"
    module = "aiomultiprocess"
    dist = "aiomultiprocess"

    async def start(self, workers: int = WORKERS) -> None:
        import aiomultiprocess  # type: ignore[import-untyped]

        self.pool = aiomultiprocess.Pool(processes=workers)

    async def stop(self) -> None:
        self.pool.terminate()
        await asyncio.wait_for(self.pool.join(), 5)

    @property
    def start_method(self) -> str:
        from aiomultiprocess.core import get_context  # type: ignore[import-untyped]

        return str(get_context().get_start_method())

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.pool.apply(_twin(fn), args)

    async def call_many(
        self, fn: Callable[..., Any], arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        twin = _twin(fn)
        return list(await asyncio.gather(*(self.pool.apply(twin, args) for args in arglists)))

    async def map(self, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        return list(await self.pool.map(_twin(fn), items))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return asyncio.ensure_future(self.pool.apply(_twin(fn), args))


def _twin(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The async twin of a task, from the module that defines it (``_tasks`` or the
    script's ``__main__``): aiomultiprocess runs only coroutine functions."""
    twins: dict[Callable[..., Any], Callable[..., Any]] = sys.modules[fn.__module__].ASYNC_TWIN
    return twins[fn]


class Billiard(AsyncResultAdapter):
    """billiard's ``Pool`` (Celery's fork of ``multiprocessing.Pool``): not run by default.

    It is here for its per-call hard time limit, ``apply_async(..., timeout=...)``: the
    result fails with ``billiard.exceptions.TimeLimitExceeded`` and the worker is killed
    (SIGTERM, then SIGKILL after 0.1 s) and replaced. The limit is checked by a thread that
    looks at the running jobs once a second. That thread exists only in a pool made with
    ``enable_timeouts=True`` (or a pool-wide ``timeout``): without it a per-call
    ``timeout`` is silently ignored. So the pool gets ``enable_timeouts=True``, which
    changes nothing else.

    A dead worker is replaced by a supervisor thread that looks every 0.8 s; the dying
    call fails with ``WorkerLostError`` only after ``lost_worker_timeout`` (10 s).
    """

    key = "billiard"
    title = "billiard"
    module = "billiard"
    dist = "billiard"
    time_limits = True

    async def start(self, workers: int = WORKERS) -> None:
        import billiard.pool  # type: ignore[import-untyped]

        self.pool: Any = billiard.pool.Pool(workers, enable_timeouts=True)

    async def stop(self) -> None:
        self.pool.terminate()
        self.pool.join()

    @property
    def start_method(self) -> str:
        return str(self.pool._ctx.get_start_method())

    def submit_limited(self, fn: Callable[..., Any], *args: Any, limit: float) -> Any:
        return self.pool.apply_async(fn, args, timeout=limit)


# The order of the table's columns; corral first, as everything is a ratio to it.
ADAPTERS: dict[str, type[Adapter]] = {
    cls.key: cls
    for cls in (
        Corral,
        ProcessPoolExecutor,
        MultiprocessingPool,
        Pebble,
        Loky,
        AioMultiprocess,
        Mpire,
        Billiard,
        CorralPrefetch,
        CorralFair,
        CorralAuto,
    )
}
# The other strategies are for choosing corral's default (--libs corral,corral-fair,...).
DEFAULT_LIBS = [
    key
    for key in ADAPTERS
    if key not in ("corral-prefetch", "corral-fair", "corral-auto", "billiard")
]


def adapter(name: str) -> type[Adapter]:
    """The adapter a library name on the command line stands for.

    ``KEY@REV`` is a corral adapter (``corral@f045384``, ``corral-prefetch@HEAD~2``) that
    measures corral as of git revision REV instead of the working tree. Raises ValueError
    for a name that is not a library.
    """
    key, _, revision = name.partition("@")
    if key not in ADAPTERS:
        raise ValueError(f"unknown library {key!r}; choose from {','.join(ADAPTERS)}")
    base = ADAPTERS[key]
    if not revision:
        return base
    if not issubclass(base, Corral):
        raise ValueError(f"only corral can be measured at a git revision, not {key!r}")
    attrs = {"key": name, "title": f"{base.title}@{revision}", "revision": revision}
    return type(f"{base.__name__}AtRevision", (base,), attrs)
