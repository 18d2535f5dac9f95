"""``LocalWorker``: jobs run in the event loop itself.

Why: a coroutine function (I/O, calls to other services) needs no process and no thread; it
is best run where it already is, as a task of the loop, with no pickling at all. A short
plain callable can run here too, and the same queue can then route heavier calls elsewhere
by ``series``. The value and the exception reach the caller as they are, traceback intact.

How it keeps the ``Worker`` contract (``corral.workers._base``):

    send(job)  ->  queued; one loop callback later the first job starts  (send never runs it)
    plain callable     runs inline in that callback: it blocks the loop while it runs
    awaitable result   becomes a task of the loop; the next job starts when it ends

- One job at a time, in the order sent; ``job_started`` before the call, ``run_time`` set
  before ``job_done`` (wall time from the call to the end of its task).
- Streams (``iterate``): the worker keeps the iterator the call returned (see ``_streaming``)
  and makes its items in batches, each a loop callback of its own, never more than its
  credit ahead of the consumer. A batch of a stream with credit alternates with the next
  waiting job, as in a process child, so a stream never holds the worker, and the loop
  runs the consumer between batches. ``cancel`` closes the generator (its ``finally``
  runs) at its next turn.
- ``corral.report`` in a call reaches ``job_report`` at once, hence before ``job_done``:
  the reporter is set in the context the call runs in, for a plain callable (or a batch
  of a stream) around that call only, for a coroutine in its task's context.
- Soft time limit: a coroutine's task is cancelled at its limit. The coroutine sees
  ``asyncio.CancelledError`` (the only exception that can be thrown into a task from
  outside); unless it handles that and finishes otherwise, the caller gets
  ``SoftTimeLimitExceeded``. A plain callable cannot be interrupted: the limit is not
  enforced on it, and its value counts.
- ``cancel``: a job not started never starts (``job_done`` with ``CancelledError`` frees its
  slot). A running coroutine's task is cancelled; if it is still running ``grace`` seconds
  later (it swallowed the cancellation), or at once when ``grace`` <= 0, the worker gives up:
  it is dead, and reports ``worker_lost`` with that job as started and the rest as
  unstarted. Nothing can stop a task that refuses cancellation, so it is left running in
  the loop, abandoned, its outcome ignored; the host starts a new worker in its place.
- ``stop`` finishes the jobs already sent, then, as a process child at EOF, closes the open
  streams and reports them lost. ``kill`` reports what it holds (its open streams as
  started) as lost at once, closes the streams and cancels a running task without waiting
  for it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .. import _log as log
from .._errors import SoftTimeLimitExceeded, WorkerLostError, WorkerStartupError
from .._job import JobState
from .._report import set_reporter
from .._streaming import Batch, LiveIterator, Turns, open_iterator
from ._base import CANCEL_GRACE, Worker, WorkerHost, WorkerState, check_initializer

if TYPE_CHECKING:
    from .._job import Job


class LocalWorker(Worker):
    """Runs jobs in the event loop: coroutines as tasks, plain callables inline."""

    kind = "local"

    def __init__(
        self,
        *,
        series: Iterable[str] | None = None,
        name: str | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
    ) -> None:
        super().__init__(series=series, name=name)
        check_initializer(initializer)
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._host: WorkerHost | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[Job[Any]] = deque()  # sent, not started, in order
        self._skipped: list[Job[Any]] = []  # cancelled before they started; to report
        self._wakeup: asyncio.Handle | None = None  # the scheduled _next
        self._current: Job[Any] | None = None  # the job running now
        self._task: asyncio.Future[Any] | None = None  # its task, for an awaitable
        self._turns: Turns[Job[Any]] = Turns()  # open streams, served in turns between jobs
        self._turn: Job[Any] | None = None  # the stream making a batch now
        self._started_at = 0.0
        self._why: str | None = None  # why its task was cancelled: "soft" or "cancel"
        self._soft: asyncio.TimerHandle | None = None
        self._overdue: asyncio.TimerHandle | None = None
        self._gone: asyncio.Future[None] | None = None

    async def start(self, host: WorkerHost) -> None:
        """Run the initializer in the loop (awaited if it returns an awaitable); raises
        ``WorkerStartupError`` with its exception as the cause if it raises."""
        if self.state is not WorkerState.NEW:
            raise RuntimeError(f"cannot start {self.name}: it is {self.state.value}")
        loop = self._loop = asyncio.get_running_loop()
        self._host = host
        self._gone = loop.create_future()
        self.state = WorkerState.STARTING
        try:
            if self._initializer is not None:
                result = self._initializer(*self._initargs)
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            self._end()
            raise WorkerStartupError(
                1, f"the initializer raised {type(exc).__name__}: {exc}"
            ) from exc
        except BaseException:  # cancelled while awaiting it: nothing is left either
            self._end()
            raise
        if self.state is not WorkerState.STARTING:
            raise WorkerStartupError(1, f"{self.name} was stopped before it started")
        self.state = WorkerState.READY

    def send(self, job: Job[Any]) -> None:
        if self.state is not WorkerState.READY:
            raise RuntimeError(f"cannot send to {self.name}: it is {self.state.value}")
        self._pending.append(job)
        self._wake()

    def cancel(self, job: Job[Any], *, grace: float = CANCEL_GRACE) -> None:
        """Stop job: one not started never starts; a running coroutine's task is cancelled,
        and the worker gives up on it if it still runs after grace seconds (0: at once)."""
        if self._loop is None or self.state is WorkerState.DEAD:
            return
        if job is self._current:
            if grace > 0:
                self._why = "cancel"
                if self._task is not None:
                    self._task.cancel()
            if self._overdue is None:  # grace <= 0: given up on one loop turn from now
                self._overdue = self._loop.call_later(
                    max(grace, 0.0), self._still_running, job, grace
                )
        elif job in self._pending:
            self._pending.remove(job)
            self._skipped.append(job)  # reported from a loop callback, never from here
            self._wake()
        elif self._turns.cancel(job):  # shut at its next turn, from a loop callback
            self._wake()

    def credit(self, job: Job[Any], n: int) -> None:
        """The consumer of job's stream took n items: the worker may make n more."""
        if self._turns.grant(job, n):
            self._wake()

    async def stop(self) -> None:
        if self.state in (WorkerState.NEW, WorkerState.DEAD):
            return
        assert self._gone is not None
        if self.state is not WorkerState.STOPPING:
            self.state = WorkerState.STOPPING
            self._wake()
        await asyncio.shield(self._gone)

    async def kill(self) -> None:
        if self.state in (WorkerState.NEW, WorkerState.DEAD):
            return
        self._give_up("it was killed by its owner")

    # -- running jobs ---------------------------------------------------------------------

    def _wake(self) -> None:
        """Schedule the next step when there is one (a skipped job is reported even while
        another runs); end a stopping worker that has nothing left."""
        if self.state is WorkerState.DEAD:
            return
        idle = self._current is None
        stopping = self.state is WorkerState.STOPPING
        if self._skipped or (
            idle and (self._pending or self._turns.waiting() or (stopping and self._turns.live))
        ):
            if self._wakeup is None:
                assert self._loop is not None
                self._wakeup = self._loop.call_soon(self._next)
        elif idle and stopping:
            self._end()

    def _next(self) -> None:
        self._wakeup = None
        while self._skipped and self.state is not WorkerState.DEAD:
            self._job_done(self._skipped.pop(0), None, asyncio.CancelledError())
        if self._current is not None or self.state is WorkerState.DEAD:
            return
        ending = self.state is WorkerState.STOPPING and not self._pending and bool(self._turns.live)
        stream = self._turns.choose(bool(self._pending), ending=ending)
        if ending and stream is None:  # cancelled ones close first
            self._shut()
            return
        if stream is not None:
            self._take_turn(stream)
            self._wake()
            return
        if not self._pending:
            self._wake()
            return
        job = self._pending.popleft()
        if job.state is JobState.CANCELLED:  # cancelled by the host without a word to us
            self._job_done(job, None, asyncio.CancelledError())
            self._wake()
            return
        self._run(job)

    def _run(self, job: Job[Any]) -> None:
        assert self._host is not None and self._loop is not None
        self._current = job
        self._why = None
        self._host.job_started(self, job)
        self._started_at = time.perf_counter()
        token = set_reporter(functools.partial(self._reported, job))
        try:
            result = job.fn(*job.args)
            # A task copies the context now: its coroutine keeps the reporter.
            task = asyncio.ensure_future(result) if inspect.isawaitable(result) else None
        except BaseException as exc:
            token.var.reset(token)
            self._done(job, None, exc)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise  # as an asyncio task does: the caller has it, and so does the loop
            return
        token.var.reset(token)
        if task is None:
            self._done(job, result, None)
            return
        self._task = task
        if job.soft_time_limit is not None:
            self._soft = self._loop.call_later(job.soft_time_limit, self._soft_limit_passed, job)
        task.add_done_callback(functools.partial(self._task_done, job))

    def _reported(self, job: Job[Any], obj: Any) -> None:
        """``corral.report(obj)`` in job's call: straight to the host."""
        if job is not self._current and job is not self._turn:
            raise RuntimeError("corral.report() was called outside a running task")
        assert self._host is not None
        self._host.job_report(self, job, obj)

    def _take_turn(self, stream: LiveIterator[Job[Any]]) -> None:
        """One batch of stream's items (or its closing, once cancelled), to the host."""
        assert self._host is not None
        job = stream.job
        self._turn = job
        token = set_reporter(functools.partial(self._reported, job))
        try:
            if stream.closing:
                batch = Batch([], False, stream.shut(job.id))
            else:
                batch = stream.produce(stream.limit())
        finally:
            token.var.reset(token)
            self._turn = None
        items, _, error = batch
        self._turns.end_turn(stream, batch)  # back of the line, or out
        if not batch.over:
            if items:
                self._host.job_items(self, job, items)
            return
        if error is not None:
            stream.discard()  # a generator that raised is closed already; an iterator not
        job.run_time = stream.run_time
        if items:
            self._host.job_items(self, job, items)
        self._job_done(job, None, error)
        if isinstance(error, KeyboardInterrupt | SystemExit):
            raise error

    def _soft_limit_passed(self, job: Job[Any]) -> None:
        self._soft = None
        if job is self._current and self._task is not None and self._why is None:
            self._why = "soft"
            self._task.cancel()

    def _task_done(self, job: Job[Any], task: asyncio.Future[Any]) -> None:
        if job is not self._current:  # given up on: its outcome is ignored
            if not task.cancelled():
                task.exception()  # retrieved, so asyncio does not log it
            return
        if not task.cancelled():
            error = task.exception()
            self._done(job, None if error is not None else task.result(), error)
            return
        try:
            task.result()
        except asyncio.CancelledError as cancelled:
            if self._why == "soft":
                assert job.soft_time_limit is not None
                soft = SoftTimeLimitExceeded(job.soft_time_limit)
                soft.__cause__ = cancelled  # its context shows where the coroutine was
                self._done(job, None, soft)
            else:
                self._done(job, None, cancelled)

    def _still_running(self, job: Job[Any], grace: float) -> None:
        self._overdue = None
        if job is self._current:
            if grace > 0:  # 0: a hard time limit, which the queue logs
                log.killed_after_cancel(self, job, grace, "abandoning its task")
            self._give_up(f"job {job.id} was still running {grace:g} s after it was cancelled")

    def _done(self, job: Job[Any], value: Any, error: BaseException | None) -> None:
        """The call ended: report its outcome, or open the stream it returned."""
        if job is not self._current:
            return
        job.run_time = time.perf_counter() - self._started_at
        self._current = self._task = None
        self._disarm()
        if job.stream is not None and error is None:
            try:
                iterator = open_iterator(job.fn, value)
            except TypeError as exc:
                error = exc
            else:
                stream = LiveIterator(job, iterator, job.stream.window, job.run_time)
                stream.closing = self._why == "cancel"  # cancelled, yet it returned
                self._turns.add(stream)
                self._wake()
                return
        self._job_done(job, value, error)
        self._wake()

    def _job_done(self, job: Job[Any], value: Any, error: BaseException | None) -> None:
        assert self._host is not None
        self._host.job_done(self, job, value, error)

    # -- the end --------------------------------------------------------------------------

    def _give_up(self, reason: str) -> None:
        """Die now: what was not started and what runs are reported lost; a running task is
        cancelled (best effort) and left to the loop, its outcome ignored."""
        if self.state is WorkerState.DEAD:
            return
        running, task = self._current, self._task
        unstarted = [*self._skipped, *self._pending]  # skipped: cancelled, never began
        self._pending.clear()
        self._skipped.clear()
        self._current = self._task = None
        streams = self._turns.drain()
        self._end()
        if task is not None and not task.done():
            task.cancel()
        for stream in streams:
            stream.discard()  # their finally runs now, not whenever they are collected
        started = [running] if running is not None else []
        started += [stream.job for stream in streams]
        if self._host is not None and (unstarted or started):
            error = WorkerLostError(self.name, None, None, reason)
            self._host.worker_lost(self, error, unstarted, started)

    def _shut(self) -> None:
        """Stopping, with no job left: close the open streams (their ``finally`` runs), as
        a process child does at EOF, and report them lost: their consumers still read."""
        lost: list[Job[Any]] = []
        for stream in self._turns.drain():
            stream.discard()
            lost.append(stream.job)
        self._end()
        if self._host is not None and lost:
            reason = "it was stopped with streams open; they were closed"
            self._host.worker_lost(self, WorkerLostError(self.name, None, None, reason), [], lost)

    def _disarm(self) -> None:
        for timer in (self._soft, self._overdue):
            if timer is not None:
                timer.cancel()
        self._soft = self._overdue = None

    def _end(self) -> None:
        self.state = WorkerState.DEAD
        self._disarm()
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
