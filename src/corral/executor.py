"""``Executor``: a corral ``Pool`` behind the ``concurrent.futures.Executor`` interface.

For code without an event loop of its own (or with one that hands work out through
``loop.run_in_executor``). There is one bridge and no second copy of the pool: each
executor owns a private event loop, run by one daemon thread, and that loop owns one
``corral.Pool``. Every call crosses over to it:

    the caller's thread                          the bridge's thread (its own event loop)

    executor.submit(fn, x)
      | ExecutorFuture made here
      | (future, fn, args) -> inbox          one call_soon_threadsafe per burst: calls
      | wake the loop, unless a drain is ----->  _drain: pool.submit(fn, x) -> Job
      |   already scheduled                           (pickled, queued, sent: the core)
      v                                                 ...a worker runs it...
    future.result() blocks                  <----- the Job's future is done:
                                                     future.set_result(value)
    future.cancel() ---------------------------->  job.cancel(): a queued job is dropped,
                                                     a running one interrupted in its worker
    executor.shutdown() ------------------------>  pool.close(): queued and running jobs
                                                     finish, workers stop; the thread ends

Only the bridge's thread touches the pool and the jobs; other threads only append to the
inbox and schedule callbacks. A task's exception reaches ``result()`` as the same type, with
the worker's traceback as its ``__cause__``, as ``Pool.run`` raises it.

What a call costs beyond the pool's own work: its future (a condition and its lock), a few
microseconds in the bridge, and the hand-overs between the two threads, which share one
GIL; a thread blocked in ``result()`` is woken, and wakes the GIL's holder, once per call it
waits for. That hand-over, not Python work, is most of the difference (profiled: about 10
µs of bridge code per call, against 1-2 voluntary context switches). Calls submitted in a
burst travel together: the loop is woken once and takes them in batches.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import multiprocessing
import multiprocessing.context
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from ._checks import check_count
from ._job import JobState
from ._pool import Pool

if TYPE_CHECKING:
    from ._job import Job

_logger = logging.getLogger("corral")

P = ParamSpec("P")
T = TypeVar("T")

# The most calls one drain hands to the pool before it lets the loop read results. A burst
# of submits (a map of 100,000) would otherwise be queued whole before any worker's result
# is read, and the workers would idle meanwhile; smaller batches cost a loop iteration (a
# select call) per batch.
DRAIN_BATCH = 256

# The executor's default most calls in flight per worker (strategy="auto"). Measured on 20,000
# no-op calls: 1.9 voluntary context switches per call one at a time, 0.5 at 4 in flight,
# 0.17 at 16, 0.04 at 64 (BENCHMARKS.md); 16 gets most of the gain for a quarter of the
# calls that 64 could leave stuck behind a long one.
PREFETCH = 16

_SHUTDOWN = "cannot schedule new futures after shutdown"

# The start methods of multiprocessing's contexts that corral's process workers can use.
_START_METHODS = ("fork", "forkserver", "spawn")

# What a job is in while a worker holds it: ``running()`` is True.
_HELD = frozenset({JobState.SENT, JobState.RUNNING})


class ExecutorFuture(concurrent.futures.Future[T]):
    """The future of a call made through ``Executor``: ``cancel()`` stops it even running.

    A standard future goes PENDING -> RUNNING -> FINISHED, and ``cancel()`` refuses once it
    is RUNNING, because a standard executor cannot stop a call in progress. corral can, so
    this future never enters the RUNNING state: it stays PENDING until the call finishes or
    is cancelled, and the base class's ``cancel()`` therefore succeeds for any call not yet
    finished. ``running()`` is answered from the job instead (True while a worker holds it).

    ``cancel()`` does three things:

    1. ``Future.cancel()``: PENDING -> CANCELLED, wakes threads blocked in ``result()`` and
       runs the done-callbacks (asyncio's ``wrap_future`` learns of it here). It returns
       False when the call finished first; then nothing else happens.
    2. ``set_running_or_notify_cancel()``: CANCELLED -> CANCELLED_AND_NOTIFIED, which tells
       ``concurrent.futures.wait`` and ``as_completed`` (a standard executor calls it when it
       comes to a cancelled call). It must run exactly once, so the first canceller does it,
       under the bridge's lock; a second concurrent ``cancel()`` only returns True.
    3. Asks the bridge's loop to cancel the corral job: a queued job is dropped; a running
       one is interrupted in its worker (``asyncio.CancelledError`` is raised inside the
       task, so its ``finally`` runs), and its process is killed and replaced if it has not
       stopped within a grace period. The future is cancelled at once; the worker stops
       soon after, and ``shutdown(wait=True)`` waits for that.

    A call that finishes while it is being cancelled is a race one side wins under the
    future's own lock: either ``cancel()`` returns False and the result stands, or the
    future is cancelled and the late result is dropped (``set_result`` raises
    ``InvalidStateError``, which the bridge ignores).

    Done-callbacks of a call that completes run in the bridge's thread: they must not block
    on another future of the same executor.
    """

    # Class defaults, overridden per instance only when they change (cheaper to make).
    _job: Job[Any] | None = None  # set and cleared in the bridge's thread only
    _withdrawn = False  # the cancellation was notified and sent (under bridge.lock)

    def __init__(self, bridge: _Bridge) -> None:
        super().__init__()
        self._bridge = bridge

    def cancel(self) -> bool:
        """Cancel the call: a queued one never runs, a running one is stopped in its
        worker. Returns False only when the call had already finished."""
        if not super().cancel():
            return False
        bridge = self._bridge
        with bridge.lock:
            if self._withdrawn:
                return True
            self._withdrawn = True
            self.set_running_or_notify_cancel()
        bridge.withdraw(self)
        return True

    def running(self) -> bool:
        """Whether a worker holds the call now (sent to it, or running). The bridge's
        thread records the hand-over just after it, so this may lag a worker's start."""
        job = self._job
        return job is not None and job.state in _HELD and not self.done()


class _Bridge:
    """The private event loop, its thread and the pool it owns; see the module docstring.

    ``lock`` guards the inbox's wake-up flag, ``closing`` and ``closed``, and each future's
    ``_withdrawn``; it is never held while waiting.
    """

    def __init__(self, pool: Pool, *, forks: bool = False) -> None:
        self.pool = pool
        self.loop = asyncio.new_event_loop()
        self.lock = threading.RLock()  # reentrant: a GC finalizer may shut down anywhere
        self.inbox: collections.deque[tuple[ExecutorFuture[Any], Callable[..., Any], Any]] = (
            collections.deque()
        )
        self.waking = False  # a drain is scheduled or running and will see the inbox
        self.closing = False  # shutdown was asked: no new calls
        self.closed = False  # the loop is closed: nothing may be scheduled on it
        # The job future of each call in the pool -> the call's ExecutorFuture (the loop's).
        self.live: dict[asyncio.Future[Any], ExecutorFuture[Any]] = {}
        self.stopped = self.loop.create_future()  # resolved by _stop: close the pool
        self._settle_cb = self._settle  # one bound method for every job
        # The pool's workers are started, or never will be; see _await_workers.
        self.workers_up = threading.Event()
        if not forks:
            self.workers_up.set()
        self.start_asked = False  # _await_workers asked the loop to start them
        self.starting: asyncio.Task[None] | None = None  # pool.start(), in the loop
        self.thread = threading.Thread(
            target=self._run, name=f"corral.Executor-{next(_numbers)}", daemon=True
        )
        try:
            self.thread.start()
        except BaseException:  # no thread to be had: leave no loop (and its fds) behind
            self.loop.close()
            raise
        _running.add(self)

    # -- any thread ---------------------------------------------------------------------------

    def put(self, future: ExecutorFuture[Any], fn: Callable[..., Any], args: Any) -> None:
        """Queue a call for the loop; raise RuntimeError after shutdown."""
        with self.lock:
            if self.closing:
                raise RuntimeError(_SHUTDOWN)
            self.inbox.append((future, fn, args))
            if not self.waking:  # else the drain under way will take this call too
                self.waking = True
                self.loop.call_soon_threadsafe(self._drain)
        if not self.workers_up.is_set():
            self._await_workers()

    def put_many(self, calls: list[tuple[ExecutorFuture[Any], Callable[..., Any], Any]]) -> None:
        """Queue several calls with one lock and at most one wake-up."""
        with self.lock:
            if self.closing:
                raise RuntimeError(_SHUTDOWN)
            self.inbox.extend(calls)
            if calls and not self.waking:
                self.waking = True
                self.loop.call_soon_threadsafe(self._drain)
        if calls and not self.workers_up.is_set():
            self._await_workers()

    def _await_workers(self) -> None:
        """Under fork, return once the pool's workers are started (the first calls wait).

        Python 3.12 refuses to fork once the interpreter has begun to shut down, before
        any exit hook runs; a program that submits and ends gets there before the bridge
        would fork lazily started workers, and the calls it was promised would fail. So,
        as ``ProcessPoolExecutor`` forks its workers in ``submit``, the first call returns
        once they are forked and up. (3.11 and 3.13 can fork at exit; it costs them this
        one wait.) From the bridge's own thread (a done-callback) calls have already run,
        so the workers were started: it must not wait for itself."""
        if threading.get_ident() == self.thread.ident:
            return
        with self.lock:
            if not self.start_asked and not self.closed:
                self.start_asked = True
                self.loop.call_soon_threadsafe(self._start_workers)
        self.workers_up.wait()  # set by _start_pool, or by _run when the loop ends

    def withdraw(self, future: ExecutorFuture[Any]) -> None:
        """Cancel future's job in the loop (at once when called from the loop's thread)."""
        if threading.get_ident() == self.thread.ident:
            self._cancel_job(future)
            return
        with self.lock:
            if not self.closed:
                self.loop.call_soon_threadsafe(self._cancel_job, future)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls, let the pool finish (cancelling queued calls if asked) and
        stop; with wait, return once the workers and the thread are gone. Idempotent.

        Called from the bridge's own thread (a done-callback), it cannot wait for itself
        and returns at once."""
        with self.lock:
            first = not self.closing
            self.closing = True
            if not self.closed and (first or cancel_futures):
                self.loop.call_soon_threadsafe(self._stop, cancel_futures)
        if wait and threading.get_ident() != self.thread.ident:
            self.thread.join()

    # -- the bridge's thread ------------------------------------------------------------------

    def _run(self) -> None:
        loop = self.loop
        serving = loop.create_task(self._serve())
        try:
            while True:
                try:
                    loop.run_until_complete(serving)
                    break
                except BaseException:
                    if serving.done():
                        raise
                    # asyncio lets SystemExit and KeyboardInterrupt out of any callback (a
                    # done-callback that calls sys.exit(), an unpickled result that exits):
                    # the loop, its pool and the calls in flight are intact, and abandoning
                    # them would fail every pending call and leave the executor dead.
                    # Say so, and carry on serving.
                    _logger.exception("a callback in %s raised; serving on", self.thread.name)
        finally:
            with self.lock:
                # closing too: a thread that ended without a shutdown (the pool failed to
                # close) refuses new calls with shutdown's error, not the closed loop's.
                self.closing = self.closed = True
            # Neither holds a call unless the pool failed to close: none may hang.
            for future in [*(call[0] for call in self.inbox), *self.live.values()]:
                future.cancel()
            loop.close()
            self.workers_up.set()  # after closed: no start can be asked of the loop now

    async def _serve(self) -> None:
        await self.stopped
        if self.starting is not None:  # its wait for all workers would outlast the close
            await asyncio.wait({self.starting})
        await self.pool.close()  # runs every queued and running job to its end

    def _start_workers(self) -> None:
        self.starting = self.loop.create_task(self._start_pool())

    async def _start_pool(self) -> None:
        try:
            await self.pool.start()
        except Exception:
            pass  # no worker will start, or shut down already: the calls' futures say why
        finally:
            self.workers_up.set()

    def _drain(self) -> None:
        """Hand up to DRAIN_BATCH calls from the inbox to the pool, and look again in the
        loop's next iteration while calls keep coming.

        Staying scheduled through a burst keeps ``waking`` set, so the submitting thread
        neither writes to the loop's wake-up pipe nor gives up the GIL for each call; the
        two threads then take turns in GIL slices instead of handing over per call. The
        first look that finds the inbox empty ends the burst (one spare iteration)."""
        if self._submit(DRAIN_BATCH):
            self.loop.call_soon(self._drain)
            return
        with self.lock:
            if self.inbox:  # a call came after the look above
                self.loop.call_soon(self._drain)
            else:
                self.waking = False  # under the lock: the next put wakes the loop itself

    def _submit(self, limit: int | None) -> int:
        """Hand calls from the inbox to the pool (at most limit); returns how many."""
        inbox = self.inbox
        submit = self.pool.submit
        live = self.live
        settle = self._settle_cb
        n = 0
        while inbox and (limit is None or n < limit):
            n += 1
            future, fn, args = inbox.popleft()
            if future._withdrawn:
                continue  # cancelled on the way: it never reaches the pool
            try:
                job = submit(fn, *args)
            except BaseException as exc:  # a call that will not pickle, a broken pool
                # BaseException too: pickling runs the call's own code (a __reduce__ that
                # calls sys.exit()), whose SystemExit is its call's error, as Pool.submit
                # raises it to its caller, not the bridge's end.
                _fail(future, exc)
                continue
            future._job = job
            live[job.future] = future
            job.future.add_done_callback(settle)
        return n

    def _settle(self, done: asyncio.Future[Any]) -> None:
        """A job's future is done: pass its outcome to the call's future."""
        future = self.live.pop(done)
        future._job = None
        if done.cancelled():
            future.cancel()  # cancelled through the future, or the pool was terminated
            return
        error = done.exception()
        try:
            if error is None:
                future.set_result(done.result())
            else:
                future.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled meanwhile from another thread: the cancellation stands

    def _cancel_job(self, future: ExecutorFuture[Any]) -> None:
        job = future._job
        if job is not None:
            job.cancel()  # queued: dropped; running: interrupted in its worker

    def _stop(self, cancel_futures: bool) -> None:
        """Shutdown, in the loop: every call accepted before it reaches the pool (or is
        cancelled, if asked, with the calls still queued), then the pool closes."""
        if cancel_futures:
            while self.inbox:
                self.inbox.popleft()[0].cancel()
            for future in list(self.live.values()):
                # Queued, or sent ahead to a worker that has not begun it (process workers
                # tell; other kinds' calls sent ahead run).
                job = future._job
                if job is not None and self.pool.unstarted(job):
                    future.cancel()
        else:
            self._submit(None)  # before the pool closes, which refuses new jobs
        if not self.stopped.done():
            self.stopped.set_result(None)


def _fail(future: ExecutorFuture[Any], error: BaseException) -> None:
    # InvalidStateError: cancelled meanwhile from another thread; the cancellation stands.
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_exception(error)


def _start_method_of(mp_context: Any, pool_options: dict[str, Any]) -> str:
    """The start method ``Executor(mp_context=...)`` stands for, checked: the context's is
    the one setting of it corral uses (its workers are not multiprocessing's processes)."""
    get_start_method = getattr(mp_context, "get_start_method", None)
    if not callable(get_start_method):
        raise TypeError(
            "mp_context must be a multiprocessing context, such as "
            f"multiprocessing.get_context('forkserver'), not {mp_context!r}"
        )
    method = get_start_method(allow_none=False)
    usable = [m for m in multiprocessing.get_all_start_methods() if m in _START_METHODS]
    if method not in usable:
        raise ValueError(
            f"mp_context's start method {method!r} cannot start corral's workers; "
            f"use a context of one of {usable}"
        )
    if pool_options.get("kind", "process") != "process" or pool_options.get("cluster"):
        raise ValueError("mp_context applies to process workers: drop it, or kind=/cluster=")
    asked = pool_options.get("start_method")
    if asked is not None and asked != method:
        raise ValueError(
            f"mp_context's start method {method!r} contradicts start_method={asked!r}: "
            "pass only one of them"
        )
    return str(method)


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` running calls in a corral ``Pool``.

    Args:
        max_workers: how many workers; None means one per CPU this process may use.
        mp_context: a multiprocessing context, as ``ProcessPoolExecutor`` takes: its start
            method is the workers' (the same as ``start_method=``); nothing else of it is
            used. A context whose start method corral cannot use is refused.
        **pool_options: passed to ``corral.Pool`` (``start_method``, ``initializer``,
            ``initargs``, ``max_tasks_per_child``, ``time_limit``, ...), and checked here.
            ``cluster`` (a Dask cluster) takes the scheduler's address, not a client.

    It behaves as the standard library's executors do, with corral's pool underneath:
    workers that crash are replaced (the call fails with ``WorkerLostError``, the executor
    keeps serving), and ``future.cancel()`` stops a call even while it runs, which also
    makes cancelling an ``await loop.run_in_executor(executor, ...)`` stop its job.
    Futures are ``ExecutorFuture``; see there for how cancellation works.

    The executor's default is ``strategy="auto"`` as the pool's, with ``prefetch=16``
    (the pool's is 32): a worker whose last call ran for under about 2 ms is sent up to
    16 calls ahead, one whose last call ran longer only one at a time.
    Each round trip through the executor costs a hand-over between the caller's thread
    and the bridge's, which prefetching shares among many short calls (about 2x the
    throughput of no-ops). The price: a call queued in a worker behind one that turns out
    long waits for it, even if another worker is idle. ``ProcessPoolExecutor`` queues
    one call ahead of its workers; pass ``strategy="fair"`` for no queueing ahead at all.

    The pool lives in a private event loop run by one daemon thread of this executor; its
    workers start with the first call (under fork, that call returns once they are up, as
    ``ProcessPoolExecutor`` forks its workers in ``submit``). ``shutdown()``, leaving
    ``with``, the executor being garbage-collected (without waiting) and the interpreter's
    exit (waiting) each close it.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        mp_context: multiprocessing.context.BaseContext | None = None,
        **pool_options: Any,
    ) -> None:
        if mp_context is not None:
            pool_options["start_method"] = _start_method_of(mp_context, pool_options)
        try:
            check_count("max_workers", max_workers, optional=True)
        except ValueError:
            raise ValueError(  # the standard library's words, then what else it may be
                f"max_workers must be greater than 0 (an int, or None), not {max_workers!r}"
            ) from None
        cluster = pool_options.get("cluster")
        if cluster is not None and not isinstance(cluster, str):
            raise ValueError(
                "Executor(cluster=...) takes the scheduler's address: the executor runs its "
                f"pool on an event loop of its own, where a client cannot be used; not {cluster!r}"
            )
        pool_options.setdefault("strategy", "auto")
        pool_options.setdefault("prefetch", PREFETCH)
        pool = Pool(max_workers, **pool_options)  # a bad option raises here, in the caller
        self._bridge = _Bridge(pool, forks=pool_options.get("start_method") == "fork")
        # Collected without a shutdown: close the pool once its calls are done, as the
        # standard library does. (At exit, _shutdown_at_exit waits for them instead.)
        weakref.finalize(self, self._bridge.shutdown, False).atexit = False

    def __repr__(self) -> str:
        state = "shut down" if self._bridge.closing else "open"
        size = self._bridge.pool.size or "?"  # a cluster's: counted once connected
        return f"<corral.Executor {size} workers {state}>"

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> ExecutorFuture[T]:
        """Schedule fn(*args, **kwargs) and return its future at once.

        Keyword arguments travel with fn through ``functools.partial``. Raises RuntimeError
        after ``shutdown()``. A call that cannot be pickled fails its future with
        ``SerializationError`` (pickling happens in the bridge's thread, as the standard
        ``ProcessPoolExecutor`` pickles in its own).
        """
        if not callable(fn):
            raise TypeError(f"the function to run must be callable, not {fn!r}")
        call: Callable[..., T] = functools.partial(fn, **kwargs) if kwargs else fn
        bridge = self._bridge
        future: ExecutorFuture[T] = ExecutorFuture(bridge)
        bridge.put(future, call, args)
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """Return an iterator of fn(*args) for args in zip(*iterables), in input order.

        As in Python 3.14: without ``buffersize`` every call is submitted now; with it, at
        most ``buffersize`` calls (chunks, when ``chunksize`` > 1) are submitted ahead of
        the consumer, and the input is read as results are taken, so an endless input
        works. ``chunksize`` > 1 sends that many calls as one job, as
        ``ProcessPoolExecutor`` does. ``timeout`` (seconds from this call) makes
        ``__next__`` raise ``TimeoutError`` for a result not ready in time. When the
        iteration stops early (an exception, a timeout, the iterator closed), the calls
        still outstanding are cancelled, running ones included.
        """
        # buffersize as Python 3.14 checks it: a TypeError for no int, with its words.
        if buffersize is not None and (
            not isinstance(buffersize, int) or isinstance(buffersize, bool)
        ):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        check_count("chunksize", chunksize)
        end = None if timeout is None else time.monotonic() + timeout
        calls: Iterator[tuple[Any, ...]] = zip(*iterables, strict=False)
        target: Callable[..., Any] = fn
        if chunksize > 1:
            calls = ((fn, chunk) for chunk in _batched(calls, chunksize))
            target = _run_chunk
        bridge = self._bridge
        first: list[tuple[ExecutorFuture[Any], Callable[..., Any], Any]] = [
            (ExecutorFuture(bridge), target, args) for args in itertools.islice(calls, buffersize)
        ]
        bridge.put_many(first)
        futures = collections.deque(future for future, _, _ in first)
        del first
        refill = calls if buffersize is not None else None
        return _results(
            futures,
            refill=refill,
            target=target,
            end=end,
            chunked=chunksize > 1,
            executor_ref=weakref.ref(self),
        )

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls and stop the workers once the calls already made are done.

        Args:
            wait: block until every pending call is done and the workers have stopped.
            cancel_futures: cancel the calls no worker has begun: those queued in the
                executor and, on process workers, those sent ahead to a worker (under the
                default strategy) that it has not begun. Running calls finish.
        """
        self._bridge.shutdown(wait, cancel_futures=cancel_futures)


def _results(
    futures: collections.deque[ExecutorFuture[Any]],
    *,
    refill: Iterator[tuple[Any, ...]] | None,
    target: Callable[..., Any],
    end: float | None,
    chunked: bool,
    executor_ref: weakref.ref[Executor],
) -> Iterator[Any]:
    """The values of map's futures, in order, topping up to ``buffersize`` ahead.

    No result is held here once yielded (nor is its future): a consumer that drops one
    frees it, as the standard library's ``map`` promises."""
    try:
        while futures:
            if refill is not None:
                executor = executor_ref()
                args = next(refill, None) if executor is not None else None
                if executor is not None and args is not None:
                    futures.append(executor.submit(target, *args))
                del executor
            timeout = None if end is None else end - time.monotonic()
            if chunked:
                chunk = _result_or_cancel(futures.popleft(), timeout)
                chunk.reverse()
                while chunk:
                    yield chunk.pop()  # popped first: the list keeps only those not yet taken
            else:
                yield _result_or_cancel(futures.popleft(), timeout)
    finally:
        for future in futures:
            future.cancel()


def _result_or_cancel(future: ExecutorFuture[Any], timeout: float | None) -> Any:
    """The future's value; one not ready in time (or a wait interrupted) is cancelled, in
    its worker too. A helper, so the future (which holds the value) dies on returning."""
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()
        raise


def _batched(calls: Iterator[tuple[Any, ...]], n: int) -> Iterator[tuple[tuple[Any, ...], ...]]:
    while chunk := tuple(itertools.islice(calls, n)):
        yield chunk


def _run_chunk(fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]) -> list[Any]:
    """Run in a worker: fn(*args) for each args of a chunk of map's calls."""
    return [fn(*args) for args in chunk]


_numbers = itertools.count(1)

# Bridges whose thread may still run: at exit each is shut down and waited for, as the
# standard library's executors are, so accepted calls finish and no worker is orphaned.
_running: weakref.WeakSet[_Bridge] = weakref.WeakSet()


@atexit.register
def _shutdown_at_exit() -> None:
    for bridge in list(_running):
        bridge.shutdown(wait=True)


# A forked child has none of its parent's bridge threads: it must not wait for them.
os.register_at_fork(after_in_child=_running.clear)
