"""corral as Celery's worker pool: ``corral.celery:TaskPool``.

    CELERY_CUSTOM_WORKER_POOL=corral.celery:TaskPool celery -A proj worker --pool custom

(or ``worker_pool = "corral.celery:TaskPool"`` in the app's configuration). Celery's
worker hands each task to the pool as a call of its tracer, with callbacks for the moment
it starts, its outcome and its time limits; a ``corral.Pool`` of worker processes runs
the calls, on an event loop of its own (uvloop's where installed) in one thread of
the worker's main process:

    Celery's main thread (its hub)              corral's thread (an asyncio loop, the Pool)

    apply_async(trace, args, callbacks) ---->   pool.submit(_run, trace, args, limits)
      one call_soon_threadsafe per burst          | pickled, sent to an idle child
                                                  v
                                                child: report(pid, start) -> trace(...)
    accept_callback(pid, start)  <-----------     the report: the task has started
    callback((failed, retval, runtime)) <----     its result (the child stored its state)
    error_callback(WorkerLostError) <--------     the child died: Celery's WorkerLostError
    error_callback(TimeLimitExceeded),  <----     past the hard limit: the child is killed
      timeout_callback(soft=False)                  and replaced

Celery's callbacks always run in its main thread: the pool posts them to the hub
(``hub.call_soon``, which wakes it), as prefork's callbacks run there; without a hub (a
transport Celery drives without its event loop) they run in corral's thread, as those of
Celery's ``threads`` pool run in its threads.

Each child is forked by multiprocessing's forkserver, which imports Celery and the app once
(found by where the worker's app object lives: ``proj.celery:app``), and set up by
Celery's own ``process_initializer`` (the app and its tasks, ``worker_process_init`` sent,
logging as Celery configures it). Not forked from the worker itself: its fork would come
from the pool's thread, and a child forked from a thread other than the main one inherits
the locks other threads held at that instant, and on Python 3.13.0 runs its signal
handlers (the soft limit's) only when a call into C checks for them. An app no import
reaches (made inside a function) is the exception: its children are forked from the pool's
thread, with it. Its soft time limits raise
Celery's ``SoftTimeLimitExceeded`` inside the task, so the task's own ``except`` catches
it. Unlike prefork's, the children are not daemonic: a task may start processes of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import itertools
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

try:
    from billiard.common import human_status
    from billiard.einfo import ExceptionInfo
    from billiard.exceptions import SoftTimeLimitExceeded as _CelerySoftLimit
    from billiard.exceptions import Terminated
    from billiard.exceptions import TimeLimitExceeded as _CeleryTimeLimit
    from billiard.exceptions import WorkerLostError as _CeleryWorkerLost
    from celery.concurrency.base import BasePool
    from celery.concurrency.prefork import process_destructor, process_initializer
    from celery.utils.log import get_logger
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"corral.celery needs Celery ({exc}): pip install 'corral[celery]'") from exc

from . import _child
from ._errors import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from ._pool import Pool
from ._report import report
from ._taskqueue import Strategy

logger = get_logger(__name__)

# How long the worker's main thread waits for the pool's thread to stop the pool: far above
# what it takes, so a pool that hangs fails loudly instead of hanging the worker.
BRIDGE_TIMEOUT = 60.0

# How long ``celery inspect stats`` waits for the pool's figures from its thread: the
# worker's main thread waits meanwhile, and a reply without them beats none.
STATS_TIMEOUT = 5.0

# The least time a child has to start, or Celery's ``worker_proc_alive_timeout`` (prefork's,
# 4 s by default) when larger. A child is up in milliseconds (the first after the
# forkserver's boot, which imports Celery and the app); one that is stuck is killed and
# replaced after this, where corral's default for spawned interpreters is a minute.
STARTUP_FLOOR = 10.0

# The apps of this process's pools that no import reaches, by key: a child forked from the
# pool's thread finds its pool's app here (the initializer's arguments are pickled, and an
# unpickled app would be a copy without the tasks the worker loaded).
_apps: dict[int, Any] = {}
_keys = itertools.count(1)


class _SoftLimit(_CelerySoftLimit, SoftTimeLimitExceeded):  # type: ignore[misc]
    """What a soft time limit raises in a Celery task: Celery's ``SoftTimeLimitExceeded``,
    which the task catches, and corral's, which the child recognises.

    Outside the task it is Celery's alone: it pickles as Celery's class, and names itself
    after it, so a result backend records what it records under prefork.
    """

    def __init__(self, limit: float) -> None:
        SoftTimeLimitExceeded.__init__(self, limit)

    def __reduce__(self) -> tuple[object, ...]:
        return (_CelerySoftLimit, self.args)


_SoftLimit.__module__ = _CelerySoftLimit.__module__
_SoftLimit.__name__ = _SoftLimit.__qualname__ = _CelerySoftLimit.__name__


def _set_up_child(app: Any, hostname: str) -> None:
    """Set a child up as prefork sets up its children.

    Celery's initializer resets SIGUSR1 (prefork's soft-limit signal), which is corral's
    interrupt here: the child's own handler is put back. ``worker_process_shutdown`` is
    sent as the child leaves by itself (the pool stopped, the child recycled or retired), as
    prefork's children send it: multiprocessing runs its exit finalizers then. A child that
    is killed (a hard limit, ``revoke(terminate=True)``, a crash) sends none, as under prefork.
    """
    interrupt = signal.getsignal(_child.INTERRUPT)
    process_initializer(app, hostname)
    multiprocessing.util.Finalize(None, process_destructor, (os.getpid(), 0), exitpriority=10)
    # Loaded now, as prefork's children inherit it from the worker: left to Celery's tracer,
    # a child's first task imported it (redis-py: 0.1 s, more on a busy machine) inside the
    # call, under the task's soft limit, which could fall there, before the task's own try.
    app.backend  # noqa: B018 (a property that loads the backend)
    signal.signal(_child.INTERRUPT, interrupt)
    _child.raise_at_soft_limits(_SoftLimit)


def _set_up_imported(where: str, hostname: str) -> None:
    """A forkserver child's initializer: import the app (``"module:name"``), set it up.

    The environment variable is Celery's mark of a child that did not inherit the worker's
    state: its initializer then prepares the task tracer afresh, as under prefork's spawn.
    """
    os.environ["FORKED_BY_MULTIPROCESSING"] = "1"
    module, _, name = where.partition(":")
    _set_up_child(getattr(importlib.import_module(module), name), hostname)


def _set_up_forked(key: int, hostname: str) -> None:
    """A forked child's initializer: the app came with the fork."""
    _set_up_child(_apps[key], hostname)


def _importable(app: Any) -> str | None:
    """Where app can be imported from in a fresh process (``"module:name"``), or None.

    Looked for among the modules loaded: the app's main module first (``Celery("proj")``),
    then any other but Celery's own (``celery._state`` holds the current app too, and a
    fresh process would find None there) and the main script's.
    """
    skip = ("celery.", "kombu.", "billiard.", "corral.", "__main__", "__mp_main__")
    names = [app.main] if app.main in sys.modules else []
    names += [name for name in list(sys.modules) if not name.startswith(skip)]
    for name in names:
        for attr, value in list(vars(sys.modules[name]).items()):
            if value is app and not attr.startswith("_"):
                return f"{name}:{attr}"
    return None


def _run(target: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> Any:
    """Run one task in a child: tell the parent it started (Celery's accept), then trace it.

    Celery's tracer stores the task's state and returns (failed, value, runtime); what it
    lets through is an exception of the pool's own (a time limit, an interrupt).
    """
    report((os.getpid(), time.monotonic()))
    return target(*args, **kwargs)


def _einfo(exc: BaseException) -> Any:
    """Celery's ``ExceptionInfo`` of exc, with a traceback (raised here for one)."""
    try:
        raise exc
    except BaseException:
        return ExceptionInfo()


class _Call:
    """One task given to the pool: Celery's callbacks, and what the pool learned of it."""

    __slots__ = (
        "__weakref__",  # Celery keeps a weak reference to the handle apply_async returns
        "accept_callback",
        "args",
        "callback",
        "error_callback",
        "job",
        "kwargs",
        "pid",
        "soft_limit",
        "soft_timer",
        "target",
        "terminated",
        "time_limit",
        "timeout_callback",
    )

    def __init__(
        self,
        target: Callable[..., Any],
        args: Any,
        kwargs: dict[str, Any],
        options: dict[str, Any],
        *,
        soft_limit: float | None,
        time_limit: float | None,
    ) -> None:
        self.target = target
        self.args = args
        self.kwargs = kwargs
        self.callback: Callable[..., Any] | None = options.get("callback")
        self.error_callback: Callable[..., Any] | None = options.get("error_callback")
        self.accept_callback: Callable[..., Any] | None = options.get("accept_callback")
        self.timeout_callback: Callable[..., Any] | None = options.get("timeout_callback")
        self.soft_limit = soft_limit
        self.time_limit = time_limit
        self.job: Any = None
        self.pid: int | None = None  # the child running it, once it has started
        self.soft_timer: asyncio.TimerHandle | None = None
        self.terminated: int | None = None  # the signal terminate_job sent its child

    def terminate(self, signum: int | None = None) -> None:
        """Celery's ``ApplyResult.terminate``: nothing beyond ``terminate_job``."""


class TaskPool(BasePool):  # type: ignore[misc]
    """Celery's worker pool, on corral: see the module's docstring.

    Options Celery gives every pool and what they become: ``limit`` (``--concurrency``)
    the number of processes; ``timeout`` / ``soft_timeout`` (``--time-limit`` /
    ``--soft-time-limit``) the default limits of calls; ``maxtasksperchild`` and
    ``max_memory_per_child`` (in KiB, as Celery counts it) the recycling limits;
    ``sched_strategy`` (``-O``) fair (Celery's default) a task only to an idle child,
    ``"fast"`` corral's ``"auto"``.
    """

    signal_safe = False  # stopping waits on another thread: not from a signal handler
    task_join_will_block = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = self.options
        self._soft_timeout: float | None = options.get("soft_timeout") or None
        self._timeout: float | None = options.get("timeout") or None
        self._max_tasks: int | None = options.get("maxtasksperchild") or None
        self._max_memory_kib: int | None = options.get("max_memory_per_child") or None
        # Celery's -O: "default" and "fair" are both fair in prefork; "fast"/"fcfs" queue
        # tasks in busy children, as corral's "auto" does with short ones.
        fast = options.get("sched_strategy") in ("fast", "fcfs")
        self._strategy: Strategy = "auto" if fast else "fair"
        self._initargs: tuple[Any, ...] = tuple(options.get("initargs") or ())
        self._key = next(_keys)
        self.start_method: str | None = None  # "forkserver", or "fork": see on_start
        self._size: int = self.limit or os.cpu_count() or 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: Pool | None = None
        self._hub: Any = None
        # From corral's thread to Celery's: callbacks waiting for the main thread.
        self._outbox: deque[Callable[[], object]] = deque()
        self._outbox_lock = threading.Lock()
        self._flush_scheduled = False
        self._posted = threading.Event()  # a callback was posted (for on_stop's wait)
        # From Celery's thread to corral's: calls not yet submitted.
        self._inbox: deque[_Call] = deque()
        self._draining = False
        self._running: dict[int, _Call] = {}  # child pid -> the call it runs (corral's thread)
        self._resizing: asyncio.Lock | None = None

    # -- start and stop (Celery's main thread) ------------------------------------------------

    def on_start(self) -> None:
        """Start corral's thread and its pool; return once every child serves."""
        app = self.app
        hostname = self._initargs[1] if len(self._initargs) > 1 else ""
        if app is None and self._initargs:
            app = self._initargs[0]
        if app is None:
            raise ValueError("corral.celery.TaskPool needs the Celery app (app=...)")
        startup = max(STARTUP_FLOOR, float(app.conf.worker_proc_alive_timeout or 0))
        where = _importable(app)
        setup: tuple[Any, tuple[Any, ...]]
        if where is not None:
            # Children forked by multiprocessing's forkserver: a process of one thread,
            # which imports Celery and the app once, so each child starts in milliseconds.
            method = "forkserver"
            setup = (_set_up_imported, (where, hostname))
            module = where.partition(":")[0]
            multiprocessing.get_context(method).set_forkserver_preload(["__main__", module])
        else:
            # An app made where no import reaches it: forked from the pool's thread, with it.
            method = "fork"
            setup = (_set_up_forked, (self._key, hostname))
            _apps[self._key] = app
        self.start_method = method
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._serve, name="corral-celery", daemon=True)
        self._thread.start()

        async def start() -> Pool:
            self._resizing = asyncio.Lock()
            pool = Pool(
                self._size,
                start_method=method,
                strategy=self._strategy,
                initializer=setup[0],
                initargs=setup[1],
                max_tasks_per_child=self._max_tasks,
                max_memory_per_child=(
                    None if self._max_memory_kib is None else self._max_memory_kib * 1024
                ),
                startup_timeout=startup,
            )
            await pool.start()
            return pool

        try:
            self._pool = self._call(start())
        except BaseException:
            self._stop_thread()
            raise

    def _serve(self) -> None:
        """corral's thread: its loop runs until the pool is stopped."""
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        loop.run_forever()

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run coro on corral's loop and wait for its result here."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def did_start_ok(self) -> bool:
        return self._pool is not None

    def register_with_event_loop(self, loop: Any) -> None:
        """Celery's hub: from now on its callbacks are posted to it."""
        self._hub = loop

    def on_stop(self) -> None:
        """Warm shutdown: every task given to the pool finishes, then the children stop.

        The hub no longer runs: this thread runs the callbacks (results, acks) meanwhile.
        """
        pool = self._pool
        if pool is None or self._loop is None:
            return
        self._pool = None
        future = asyncio.run_coroutine_threadsafe(pool.close(), self._loop)
        future.add_done_callback(lambda _: self._posted.set())
        while not future.done():
            self._posted.wait()
            self._posted.clear()
            self._flush()
        self._flush()
        self._stop_thread()
        future.result()

    def on_terminate(self) -> None:
        """Cold shutdown: kill the children now; their tasks are not waited for."""
        pool = self._pool
        if pool is None or self._loop is None:
            return
        self._pool = None
        try:
            self._call(pool.terminate(), BRIDGE_TIMEOUT)
        finally:
            self._stop_thread()

    def on_close(self) -> None:
        """Celery closes the pool before it stops it: nothing to do until then."""

    def _stop_thread(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(BRIDGE_TIMEOUT)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None
        _apps.pop(self._key, None)

    # -- tasks --------------------------------------------------------------------------------

    def on_apply(
        self,
        target: Callable[..., Any],
        args: Any = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> _Call:
        """Hand a task to corral's thread (Celery's main thread); returns its handle."""
        call = _Call(
            target,
            args or (),
            kwargs or {},
            options,
            soft_limit=options.get("soft_timeout") or self._soft_timeout,
            time_limit=options.get("timeout") or self._timeout,
        )
        self._inbox.append(call)
        if not self._draining:  # else the drain scheduled will take this call too
            self._draining = True
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._drain)
        return call

    def _drain(self) -> None:
        """corral's thread: submit the calls Celery handed over."""
        self._draining = False  # set before taking, so a call appended after is not missed
        pool = self._pool
        inbox = self._inbox
        while inbox:
            call = inbox.popleft()
            if pool is None:  # stopped meanwhile: Celery's shutdown decides their fate
                continue
            try:
                job = pool.submit(
                    _run,
                    call.target,
                    call.args,
                    call.kwargs,
                    time_limit=call.time_limit,
                    soft_time_limit=call.soft_limit,
                )
            except Exception as exc:  # unpicklable, or the pool is closing
                self._fail(call, exc)
                continue
            call.job = job
            job.on_report(functools.partial(self._accepted, call))
            job.add_done_callback(functools.partial(self._done, call))

    def _accepted(self, call: _Call, started: tuple[int, float]) -> None:
        """corral's thread: the child began the task."""
        pid, at = started
        call.pid = pid
        self._running[pid] = call
        if call.soft_limit and call.timeout_callback is not None and self._loop is not None:
            call.soft_timer = self._loop.call_later(call.soft_limit, self._soft_passed, call)
        if call.accept_callback is not None:
            self._post(call.accept_callback, pid, at)

    def _soft_passed(self, call: _Call) -> None:
        """The soft limit passed for a task still running: Celery logs it (the child
        raises it in the task)."""
        call.soft_timer = None
        assert call.timeout_callback is not None
        self._post(call.timeout_callback, True, call.soft_limit)

    def _done(self, call: _Call, job: Any) -> None:
        """corral's thread: the call ended; tell Celery how, as prefork would."""
        if call.pid is not None and self._running.get(call.pid) is call:
            del self._running[call.pid]
        if call.soft_timer is not None:
            call.soft_timer.cancel()
            call.soft_timer = None
        if job.cancelled():
            return  # the pool was terminated (cold shutdown): Celery forgets the task
        error = job.exception()
        if error is None:
            if call.callback is not None:
                self._post(call.callback, job.result())
            return
        if isinstance(error, TimeLimitExceeded):
            # prefork's order: the failure, then the timeout (which logs and records it)
            limit = call.time_limit or error.limit
            self._fail(call, _CeleryTimeLimit(limit))
            if call.timeout_callback is not None:
                self._post(call.timeout_callback, False, limit)
        elif isinstance(error, WorkerLostError):
            status = _status(error)
            if call.terminated is not None:  # revoke(terminate=True): already announced
                self._fail(call, Terminated(call.terminated))
                return
            logger.error("Process %r pid:%r exited with %r", error.worker, call.pid, status)
            self._fail(
                call,
                _CeleryWorkerLost(f"Worker exited prematurely: {status} Job: {job.id}."),
            )
        elif isinstance(error, Exception):
            self._fail(call, error)
        else:  # SystemExit, KeyboardInterrupt out of the task: as Celery's apply_target
            self._fail(call, _CeleryWorkerLost(repr(error)))

    def _fail(self, call: _Call, exc: BaseException) -> None:
        if call.error_callback is not None:
            self._post(call.error_callback, _einfo(exc))

    def terminate_job(self, pid: int, sig: int | None = None) -> None:
        """``revoke(terminate=True)``: send the signal (SIGTERM) to the child running the
        task. Checked in corral's thread, where children are reaped, so a pid that is no
        longer a child of the pool's is never signalled."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._terminate, pid, sig or signal.SIGTERM)

    def _terminate(self, pid: int, signum: int) -> None:
        call = self._running.get(pid)
        if call is None or call.job is None or call.job.done():
            return
        call.terminated = signum
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    # -- callbacks to Celery's thread -------------------------------------------------------

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        """corral's thread: have Celery's main thread call fn(*args) soon."""
        hub = self._hub
        if hub is None:
            _apply(fn, args)  # no hub: here, as Celery's threads pool calls them
            return
        self._outbox.append(functools.partial(fn, *args))
        with self._outbox_lock:
            scheduled, self._flush_scheduled = self._flush_scheduled, True
        if not scheduled:
            hub.call_soon(self._flush)  # wakes the hub
        self._posted.set()

    def _flush(self) -> None:
        """Celery's main thread: run the callbacks posted so far, in order."""
        with self._outbox_lock:
            # cleared before taking, so a callback posted after schedules a flush of its own
            self._flush_scheduled = False
        outbox = self._outbox
        while outbox:
            _apply(outbox.popleft(), ())

    # -- size -------------------------------------------------------------------------------

    @property
    def num_processes(self) -> int:
        return self._size

    def grow(self, n: int = 1) -> None:
        """``--autoscale`` and ``pool_grow``: n more children (started in the background)."""
        self._resize(self._size + n)

    def shrink(self, n: int = 1) -> None:
        """``--autoscale`` and ``pool_shrink``: n fewer; a busy child finishes its task."""
        self._resize(max(1, self._size - n))

    def _resize(self, size: int) -> None:
        self._size = size
        loop = self._loop
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self._follow_size(), loop)

    async def _follow_size(self) -> None:
        """corral's thread: bring the pool to the latest size asked for, one resize at a
        time (a grow and a shrink asked together end at the later one)."""
        assert self._resizing is not None
        async with self._resizing:
            pool = self._pool
            if pool is not None and not pool.closed and pool.size != self._size:
                try:
                    await pool.resize(self._size)
                except Exception:
                    logger.exception("corral could not resize the pool to %d", self._size)

    def restart(self) -> None:
        raise NotImplementedError("corral.celery.TaskPool does not restart its children")

    # -- figures ------------------------------------------------------------------------------

    def _get_info(self) -> dict[str, Any]:
        """``celery inspect stats``: prefork's figures, and corral's."""
        info: dict[str, Any] = super()._get_info()
        pool, loop = self._pool, self._loop
        info.update(
            {
                "max-concurrency": self._size,
                "max-tasks-per-child": self._max_tasks or "N/A",
                "max-memory-per-child": self._max_memory_kib or "N/A",
                "timeouts": (self._soft_timeout or 0, self._timeout or 0),
                "put-guarded-by-semaphore": False,
            }
        )
        if pool is None or loop is None:
            return info

        async def stats() -> Any:
            return pool.stats()

        try:
            s = self._call(stats(), STATS_TIMEOUT)
        except TimeoutError:  # the pool's thread is busy: Celery's thread must not wait on
            logger.warning("corral's pool did not answer for its stats within %g s", STATS_TIMEOUT)
            return info
        info.update(
            {
                "processes": [w.pid for w in s.workers if w.pid is not None],
                "strategy": self._strategy,
                "start-method": self.start_method,
                "queued": s.queued,
                "in-flight": s.in_flight,
                "calls": s.calls,
                "failed": s.failed,
                "tasks-per-child": {str(w.pid): w.tasks_done for w in s.workers},
                "rss-per-child": {str(w.pid): w.rss for w in s.workers},
                "run-time-p50": s.run.p50,
                "run-time-p99": s.run.p99,
            }
        )
        return info


def _new_loop() -> asyncio.AbstractEventLoop:
    """The pool thread's loop: uvloop's where it is installed (``corral[uvloop]``).

    The thread shares the GIL with Celery's main thread, so its Python time per task is
    taken from Celery's: on uvloop the worker ran about 1.4x the no-op tasks per second
    of asyncio's loop (BENCHMARKS.md, "Celery's pool").
    """
    try:
        import uvloop  # noqa: PLC0415 (optional: the corral[uvloop] extra)
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _apply(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Call one of Celery's callbacks; one that raises is logged, as billiard does."""
    try:
        fn(*args)
    except Exception as exc:
        logger.error("Pool callback raised exception: %r", exc, exc_info=True)


def _status(error: WorkerLostError) -> str:
    """How a child died, in billiard's words ("signal 9 (SIGKILL)", "exitcode 1")."""
    if error.signal is not None:
        return str(human_status(-error.signal))
    return str(human_status(error.exitcode or 0))


__all__ = ["TaskPool"]
