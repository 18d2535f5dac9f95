"""What a Dask worker runs for ``DaskWorker``: the tasks it submits, and their state.

Why a module of its own: a Dask worker process imports this module to run the tasks that
``corral.workers._dask`` (the parent's side) submits. They are pickled by reference, as
``corral.workers._dask_remote.<name>``, so corral must be importable there, from the same
version as the parent. Nothing here holds the parent's state (its client, its jobs, its
event loop): only what lives in the Dask worker process itself, the table of the streams it
keeps between batches and the soft limit of the call running in each of its threads.

The tasks, each run in a thread of a Dask worker:

    run_call(fn, args, where, announce, soft_limit)  fn(*args) -> its outcome, pickled
    open_stream(fn, args, where, n)                  fn(*args), kept as a stream -> a Batch
    pull_stream(where, handle, n)                    the stream's next Batch (pinned there)
    close_stream(handle)                             close its generator (``finally`` runs)

The reports of fn, and the small outcome of a ``run_call`` ahead of its end, go as events
of the parent worker's topic (``where``: the topic and the task's key). No task raises the
exception of fn: it returns it pickled, with its traceback, so Dask never retries or wraps it.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

from .._errors import SerializationError, SoftTimeLimitExceeded
from .._interrupt import SoftLimitInterrupt, raise_in, soft_limits
from .._report import set_reporter
from .._streaming import BATCH_SECONDS, LiveIterator, open_iterator
from .._wire import describe, dumps, dumps_error, dumps_report

# A call's outcome that pickles into at most this many bytes also travels as an event of
# the worker's topic, ahead of the task's end on the same streams, which saves fetching it
# (a round trip through the scheduler). The scheduler keeps a topic's last 1000 events
# (``distributed.admin.low-level-log-length``), so this bounds what they hold: ~2 MiB.
PUSH_MAX = 2048

# Both sides need distributed: the parent's side (``_dask``) imports it through here too.
_INSTALL = "DaskWorker needs dask.distributed: pip install 'corral[dask]'"


def distributed_module() -> Any:
    """The ``distributed`` module, imported on first use; ``ImportError`` with the fix."""
    try:
        return importlib.import_module("distributed")
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc


class _Running:
    """One call running in a Dask worker thread, as its soft-limit timer sees it."""

    def __init__(self) -> None:
        self.ident = threading.get_ident()
        self.lock = threading.Lock()
        self.running = True

    def interrupt(self) -> None:
        """Raise ``SoftLimitInterrupt`` in the call, if it still runs (the timer's thread)."""
        with self.lock:
            if self.running:
                raise_in(self.ident, SoftLimitInterrupt)

    def end(self) -> None:
        """The call returned: withdraw an interrupt not yet raised; none comes later."""
        with self.lock:
            self.running = False
            raise_in(self.ident, None)


class _Reporter:
    """``corral.report`` in a task: each object goes, pickled, as an event of the topic."""

    def __init__(self, where: tuple[str, str]) -> None:
        self.topic, self.key = where
        self.sent = 0
        self._worker: Any = None

    def __call__(self, obj: Any) -> None:
        payload = dumps_report(obj)
        self.event("report", payload.data, [bytes(b) for b in payload.buffers])
        self.sent += 1

    def event(self, kind: str, *body: Any) -> None:
        if self._worker is None:
            self._worker = distributed_module().get_worker()
        self._worker.log_event(self.topic, (self.key, kind, *body))


def _reporting(where: tuple[str, str]) -> tuple[_Reporter, contextvars.Context]:
    """A reporter for one task's call, and the context to run it in, where
    ``corral.report`` reaches that reporter alone."""
    reporter = _Reporter(where)
    context = contextvars.copy_context()
    context.run(set_reporter, reporter)
    return reporter, context


def _error(exc: BaseException, run_time: float | None) -> tuple[bytes, list[bytes]]:
    """exc, its traceback text and run_time, pickled (a stand-in if exc will not pickle)."""
    encoded = dumps_error(exc, run_time)
    return encoded.data, [bytes(b) for b in encoded.buffers]


def _call(
    fn: Callable[..., Any], args: tuple[Any, ...], soft_limit: float | None
) -> tuple[Any, BaseException | None]:
    """fn(*args) (an awaitable result runs to its end on a loop of its own), with its soft
    limit raised inside it; returns (value, exception)."""
    timer: threading.Timer | None = None
    running: _Running | None = None
    try:
        try:
            if soft_limit:
                soft_limits.soft_time_limit = soft_limit
                running = _Running()
                timer = threading.Timer(soft_limit, running.interrupt)
                timer.daemon = True
                timer.start()
            value = fn(*args)
            if inspect.iscoroutine(value):
                value = asyncio.run(value)
            error: BaseException | None = None
        except BaseException as exc:
            value, error = None, exc
        finally:
            if timer is not None and running is not None:
                timer.cancel()
                running.end()
    except SoftLimitInterrupt as exc:  # it landed just after the call, before end(): its outcome
        value, error = None, exc
    if isinstance(error, SoftLimitInterrupt):
        soft = SoftTimeLimitExceeded(soft_limit or 0.0)
        soft.__context__ = error.__context__
        error = soft.with_traceback(error.__traceback__)
    return value, error


# A pickle and its out-of-band buffers (corral's ``dumps``): what the tasks return. Pickled
# by us, not by Dask, which handles a Python container item by item (several times slower
# for a list of a thousand small items), and so that a value that will not pickle fails as
# ``SerializationError`` naming it, as in a process worker.
Pickled = tuple[bytes, list[Any]]


def _pickled(obj: Any) -> Pickled:
    encoded = dumps(obj)
    return encoded.data, list(encoded.buffers)


def unpickled(blob: Pickled) -> Any:
    data, buffers = blob
    return pickle.loads(data, buffers=buffers)


def run_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    where: tuple[str, str],
    announce: bool,
    soft_limit: float | None,
) -> Pickled:
    """A job as a Dask task: (ok, value or pickled error, run_time, reports sent), pickled.
    Never raises, so Dask never retries or wraps the task's own exception. where: the
    topic of its events and its key. A small outcome is also sent ahead (``PUSH_MAX``)."""
    reporter, context = _reporting(where)
    if announce:
        reporter.event("started")
    start = time.perf_counter()
    value, error = context.run(_call, fn, args, soft_limit)
    run_time = time.perf_counter() - start
    if error is None:
        try:
            blob = _pickled((True, value, run_time, reporter.sent))
        except Exception as exc:
            error = SerializationError(
                f"the result of {describe(fn)} ({describe(value)})",
                "in the worker",
                f"{type(exc).__name__}: {exc}",
            )
    if error is not None:
        blob = _pickled((False, _error(error, run_time), run_time, reporter.sent))
    data, buffers = blob
    if not buffers and len(data) <= PUSH_MAX:
        reporter.event("outcome", data)
    return blob


# Live streams of this Dask worker process, by the key of the task that opened each, with
# a lock: one batch (or the close) at a time, though pulls run in the worker's threads.
# Their credit is the parent's: each pull names how many items it may take.
_streams: dict[str, tuple[LiveIterator[str], threading.Lock]] = {}

# A batch: (pickled items, ended, pickled error or None, run_time, reports sent, worker
# address); the address is None when the stream is not known there (its worker died).
Batch = tuple[Pickled, bool, Pickled | None, float, int, str | None]
NO_ITEMS: Pickled = (pickle.dumps([], 5), [])


def _take(live: LiveIterator[str], lock: threading.Lock, n: int, reporter: _Reporter) -> Batch:
    """Up to n items of a stream: fewer once making them took five times ``BATCH_SECONDS``.

    Why five: each batch here is a Dask task's round trip through the scheduler
    (milliseconds, where a process child's is one frame), which more items share, while a
    slow generator's items still reach the consumer soon. Why a time and not an adapted
    size: the pull asks for as many items as the credit allows (see ``_dask._batch``).
    """
    with lock:
        before = live.run_time
        items, ended, error = live.produce(n, within=5 * BATCH_SECONDS)
        run_time = live.run_time - before
        failure = None if error is None else _error(error, None)
        try:
            blob = _pickled(items)
        except Exception as exc:
            blob = NO_ITEMS
            error = SerializationError(
                f"an item of the stream ({describe(items[0])})",
                "in the worker",
                f"{type(exc).__name__}: {exc}",
            )
            failure = failure or _error(error, None)
            live.discard()
    if ended or failure is not None:
        _streams.pop(live.job, None)
    return blob, ended, failure, run_time, reporter.sent, distributed_module().get_worker().address


def open_stream(
    fn: Callable[..., Any], args: tuple[Any, ...], where: tuple[str, str], n: int
) -> Batch:
    """Call fn, keep the iterator it returns under its task's key, take its first batch."""
    reporter, context = _reporting(where)
    key = reporter.key
    start = time.perf_counter()
    value, error = context.run(_call, fn, args, None)
    run_time = time.perf_counter() - start
    address = distributed_module().get_worker().address
    if error is None:
        try:
            iterator = open_iterator(fn, value)
        except TypeError as exc:
            error = exc
    if error is not None:
        return NO_ITEMS, True, _error(error, run_time), run_time, reporter.sent, address
    held = _streams[key] = (LiveIterator(key, iterator, 0), threading.Lock())
    items, ended, failure, more, sent, _ = context.run(_take, *held, n, reporter)
    return items, ended, failure, run_time + more, sent, address


def pull_stream(where: tuple[str, str], handle: str, n: int) -> Batch:
    """The next batch of the stream kept under handle; no address if it is not here."""
    held = _streams.get(handle)
    if held is None:
        return NO_ITEMS, True, None, 0.0, 0, None
    reporter, context = _reporting(where)
    return context.run(_take, *held, n, reporter)


def close_stream(key: str) -> None:
    """Close the stream kept under key (its generator's ``finally`` runs), if it is here."""
    held = _streams.pop(key, None)
    if held is not None:
        live, lock = held
        with lock:  # after a batch still running for the cancelled pull
            live.discard()
