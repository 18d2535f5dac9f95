"""``ThreadWorker``: jobs run in one dedicated daemon thread.

Why: a call that blocks (a synchronous client, file I/O, a C library that releases the GIL)
must not block the event loop, and needs no process: nothing is pickled, and the value or
the exception comes back as it is, traceback intact. One thread per worker, so a queue
decides how many calls run at once.

The loop and the thread meet under one lock, in four places:

    loop thread                                worker thread
      send()       -- _pending ------------->  _take(): a job, or a stream's turn
      credit()     -- Turns.grant() -------->  (the consumer took items: more may be made)
      _flush()     <-- _outbox, one wake-up --  started, items, reports, done: batched, in order
      _interrupt() -- async exception ------>  raised inside the running call

- One job at a time, in the order sent; every host callback is made in the loop's thread;
  ``run_time`` (seconds in the call) is set before ``job_done``. An awaitable result runs
  to its end on the thread's own event loop (made on first use, closed with the thread).
- Streams (``iterate``): the thread keeps the iterator the call returned (see ``_streaming``)
  and makes its items in batches, never more than its credit ahead of the consumer; a turn
  of a stream with credit alternates with the next waiting job, as in a process child, so a
  stream never holds the worker. Items go through the same outbox as every other event, so
  they reach the host before the stream's ``job_done``. ``cancel`` closes the generator in
  this thread (its ``finally`` runs): at its next turn if it waits for credit, or after
  interrupting the batch it is making.
- ``corral.report`` in a call posts the object to the outbox too: it reaches
  ``job_report`` in order, before the job's ``job_done``.
- Soft time limit (a timer of the loop, armed when the job starts): a plain call gets
  ``SoftTimeLimitExceeded`` raised inside it (see ``_interrupt``) and may catch
  it. A coroutine's task is cancelled instead (an asynchronous exception would land in the
  thread's event loop, not in the coroutine): it sees ``CancelledError``, and the caller
  gets ``SoftTimeLimitExceeded``.
- ``cancel``: a job not started never starts (``job_done`` with ``CancelledError``). A
  running one is interrupted the same way with ``asyncio.CancelledError``. An asynchronous
  exception lands only between bytecodes, so a call blocked in C (``time.sleep``, a socket
  read) or one that catches it runs on. If it is still running ``grace`` seconds later (at
  once when ``grace`` <= 0) the worker gives up: a thread cannot be killed, so it is
  abandoned (a daemon left to finish; its outcome is ignored), the worker is dead, and it
  reports ``worker_lost`` with the job and its open streams as started and the rest as
  unstarted. The host puts a new worker in its place.
- ``stop`` finishes the jobs already sent, then, as a process child at EOF, closes the open
  streams (their ``finally`` runs) and reports them lost; the thread's last act tells the
  loop, which then joins it without blocking. ``kill`` reports what it holds as lost at
  once, interrupts a running call (best effort) and waits only for an idle thread with no
  open streams (it exits at once; one with streams exits once it has closed them).

Races: the loop interrupts only under the lock, and only the job still current. After a
call (or a stream's turn) the thread takes the lock, withdraws any interrupt not yet raised,
and clears the current job, so none reaches a later step. One landing just outside the call
escapes to the serve loop, which reports it as that job's outcome (a stream's: it is closed);
each kind fires at most once per turn, so two levels of handler there absorb every one.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import _log as log
from .._errors import SoftTimeLimitExceeded, WorkerLostError, WorkerStartupError
from .._interrupt import SoftLimitInterrupt, raise_in, soft_limits
from .._job import JobState
from .._report import set_reporter
from .._streaming import Batch, LiveIterator, Turns, open_iterator
from ._base import CANCEL_GRACE, Worker, WorkerHost, WorkerState, check_initializer

if TYPE_CHECKING:
    from .._job import Job

_INTERRUPTS = (asyncio.CancelledError, SoftTimeLimitExceeded)


# What an event tells the loop about its job.
_STARTED, _ITEMS, _REPORT, _DONE = range(4)


class _Event(NamedTuple):
    """What the thread tells the loop: a job started, sent items (value) or a report
    (value), or ended with value or error."""

    kind: int
    job: Job[Any]
    value: Any = None
    error: BaseException | None = None
    run_time: float | None = None


class ThreadWorker(Worker):
    """Runs jobs one at a time in a daemon thread named ``corral-<name>``."""

    kind = "thread"

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
        self._thread: threading.Thread | None = None
        self._ident = 0
        self._up: asyncio.Future[BaseException | None] | None = None
        self._ended: asyncio.Future[None] | None = None  # dead: exited or abandoned
        self._exited: asyncio.Future[None] | None = None  # the thread is gone and joined
        self._soft: dict[Job[Any], asyncio.TimerHandle] = {}
        self._overdue: dict[Job[Any], asyncio.TimerHandle] = {}
        # Shared with the thread, under _lock:
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._pending: deque[Job[Any]] = deque()
        self._outbox: list[_Event] = []
        self._flush_scheduled = False
        self._closing = False  # exit once _pending is empty
        self._abandoned = False  # take nothing more, report nothing more
        self._current: Job[Any] | None = None  # the job running now, or taking its turn
        self._turns: Turns[Job[Any]] = Turns()  # open streams; only the thread runs them
        self._fired: set[str] = set()  # interrupts sent to the current job
        self._why: str | None = None  # "soft" or "cancel": what the current job was told
        self._coroutine_fn = False  # the current job's task will be cancelled, not raised in
        self._task: asyncio.Future[Any] | None = None  # its task on the thread's loop
        # The thread's own:
        self._runner: asyncio.Runner | None = None  # its event loop, for awaitables
        self._started_at = 0.0
        self._stray: BaseException | None = None
        self._turn: LiveIterator[Job[Any]] | None = None  # the stream taking its turn
        self._limit = 0  # items that turn may make; 0: it closes the stream

    async def start(self, host: WorkerHost) -> None:
        """Start the thread and run the initializer in it; raises ``WorkerStartupError``
        (its exception as the cause) when it raises, once the thread has ended."""
        if self.state is not WorkerState.NEW:
            raise RuntimeError(f"cannot start {self.name}: it is {self.state.value}")
        loop = self._loop = asyncio.get_running_loop()
        self._host = host
        self._up = loop.create_future()
        self._ended = loop.create_future()
        self._exited = loop.create_future()
        self.state = WorkerState.STARTING
        thread = threading.Thread(target=self._main, name=f"corral-{self.name}", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # can't start new thread
            self._end()
            raise WorkerStartupError(1, f"could not start a thread: {exc}") from exc
        self._thread = thread
        self._ident = thread.ident or 0
        try:
            failure = await asyncio.shield(self._up)
        except BaseException:  # cancelled: the thread ends once the initializer returns
            self._close()
            self._end()
            raise
        if failure is not None:
            await asyncio.shield(self._exited)
            raise WorkerStartupError(
                1, f"the initializer raised {type(failure).__name__}: {failure}"
            ) from failure
        if self.state is not WorkerState.STARTING:
            raise WorkerStartupError(1, f"{self.name} was stopped before it started")
        self.state = WorkerState.READY

    def send(self, job: Job[Any]) -> None:
        if self.state is not WorkerState.READY:
            raise RuntimeError(f"cannot send to {self.name}: it is {self.state.value}")
        with self._lock:
            self._pending.append(job)
            self._wakeup.notify()

    def cancel(self, job: Job[Any], *, grace: float = CANCEL_GRACE) -> None:
        """Stop job: one not started never starts; a running one gets ``CancelledError``,
        and the thread is abandoned if it still runs after grace seconds (0: at once)."""
        loop = self._loop
        if loop is None or self.state is WorkerState.DEAD:
            return
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
                self._post(_Event(_DONE, job, None, asyncio.CancelledError()), loop.call_soon)
                return
            if self._turns.cancel(job):  # shut at its next turn, or after this one
                self._wakeup.notify()
            if job is not self._current:
                return  # done, not ours, or a stream waiting for its turn
            if grace > 0:
                self._interrupt_locked("cancel")
        if job not in self._overdue:  # grace <= 0: given up on one loop turn from now
            self._overdue[job] = loop.call_later(max(grace, 0.0), self._still_running, job, grace)

    def credit(self, job: Job[Any], n: int) -> None:
        """The consumer of job's stream took n items: the thread may make n more."""
        with self._lock:
            if self._turns.grant(job, n):
                self._wakeup.notify()

    async def stop(self) -> None:
        if self.state in (WorkerState.NEW, WorkerState.DEAD):
            return
        assert self._ended is not None
        if self.state is not WorkerState.STOPPING:
            self.state = WorkerState.STOPPING
            self._close()
        await asyncio.shield(self._ended)

    async def kill(self) -> None:
        if self.state in (WorkerState.NEW, WorkerState.DEAD):
            return
        assert self._exited is not None
        with self._lock:
            idle = self._current is None and self.state is not WorkerState.STARTING
            idle = idle and not self._turns.live  # else it exits once it has closed them
        self._give_up(None, "it was killed by its owner")
        if idle:  # it is waiting for work, and exits at once
            await asyncio.shield(self._exited)

    # -- in the loop's thread -------------------------------------------------------------

    def _interrupt(self, job: Job[Any], kind: str) -> None:
        with self._lock:
            if job is self._current:
                self._interrupt_locked(kind)

    def _interrupt_locked(self, kind: str) -> None:
        """Interrupt the current job (kind "soft" or "cancel"), once per kind; holds _lock."""
        if kind in self._fired:
            return
        self._fired.add(kind)
        if self._why != "cancel":
            self._why = kind
        task = self._task
        if task is not None:  # the thread's loop is open while it runs the task
            task.get_loop().call_soon_threadsafe(task.cancel)
        elif not self._coroutine_fn:  # a coroutine function's task is cancelled at birth
            raise_in(
                self._ident, asyncio.CancelledError if kind == "cancel" else SoftLimitInterrupt
            )

    def _still_running(self, job: Job[Any], grace: float) -> None:
        self._overdue.pop(job, None)
        reason = f"job {job.id} was still running {grace:g} s after it was cancelled"
        self._give_up(job, f"{reason}; its thread was abandoned", grace)

    def _flush(self) -> None:
        with self._lock:
            events, self._outbox = self._outbox, []
            self._flush_scheduled = False
        self._deliver(events)

    def _deliver(self, events: list[_Event]) -> None:
        host, loop = self._host, self._loop
        assert host is not None and loop is not None
        for event in events:
            kind, job = event.kind, event.job
            if kind == _ITEMS:
                host.job_items(self, job, event.value)
                continue
            if kind == _REPORT:
                host.job_report(self, job, event.value)
                continue
            if kind == _STARTED:
                host.job_started(self, job)
                if job.soft_time_limit is not None:
                    self._soft[job] = loop.call_later(
                        job.soft_time_limit, self._interrupt, job, "soft"
                    )
                continue
            for timers in (self._soft, self._overdue):
                timer = timers.pop(job, None)
                if timer is not None:
                    timer.cancel()
            if event.run_time is not None:
                job.run_time = event.run_time
            host.job_done(self, job, event.value, event.error)

    def _give_up(self, job: Job[Any] | None, reason: str, grace: float = 0.0) -> None:
        """Die now, abandoning the thread: report what it held (job: only if that job is
        still the one running, having ignored its cancel for grace seconds; 0: a hard time
        limit, which the queue logs). Outcomes it posted before still count, and come first.
        """
        if self.state is WorkerState.DEAD:
            return
        with self._lock:
            running = self._current
            if job is not None and running is not job:
                return  # it ended just now; its outcome is on its way
            self._abandoned = True
            self._closing = True
            self._wakeup.notify()
            if running is not None:
                self._interrupt_locked("cancel")  # best effort, to let the thread end
            events, self._outbox = self._outbox, []
            # Streams stay registered: the thread closes them as it exits.
            streams = [s for s in self._turns.live if s is not running]
        if job is not None and grace > 0:  # known under the lock: job still runs
            log.killed_after_cancel(self, job, grace, "abandoning its thread")
        self._deliver(events)  # the host may send more: they join _pending, collected next
        with self._lock:
            unstarted = list(self._pending)
            self._pending.clear()
        self._end()
        started = [running, *streams] if running is not None else streams
        if self._host is not None and (unstarted or started):
            error = WorkerLostError(self.name, None, None, reason)
            self._host.worker_lost(self, error, unstarted, started)

    def _close(self) -> None:
        with self._lock:
            self._closing = True
            self._wakeup.notify()

    def _started_up(self, failure: BaseException | None) -> None:
        if self._up is not None and not self._up.done():
            self._up.set_result(failure)

    def _thread_exited(self) -> None:
        self._flush()
        assert self._thread is not None
        self._thread.join()  # it is returning: this was its last act
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(None)
        if self.state is WorkerState.STOPPING:  # reports nothing without open streams
            self._give_up(None, "it was stopped with streams open; they were closed")
        elif self.state is not WorkerState.DEAD:
            self._give_up(None, "its thread ended unexpectedly")  # reports nothing if idle
        self._end()

    def _end(self) -> None:
        self.state = WorkerState.DEAD
        self._started_up(None)  # a start() still waiting raises: the worker is dead
        for timers in (self._soft, self._overdue):
            for timer in timers.values():
                timer.cancel()
            timers.clear()
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    # -- in the worker thread -------------------------------------------------------------

    def _main(self) -> None:
        try:
            set_reporter(self._report)  # this thread's context, inherited by its tasks
            if self._initialize():
                self._serve()
        finally:
            self._close_streams()
            if self._runner is not None:
                self._runner.close()  # cancels what is left, shuts generators down
            self._call_loop(self._thread_exited)

    def _initialize(self) -> bool:
        try:
            if self._initializer is not None:
                result = self._initializer(*self._initargs)
                if inspect.isawaitable(result):
                    self._private_loop().run_until_complete(result)
        except BaseException as exc:
            self._call_loop(self._started_up, exc)
            return False
        self._call_loop(self._started_up, None)
        return True

    def _serve(self) -> None:
        # Two levels: a stray interrupt (see the module docstring) may land in the first
        # handler too. Either way it becomes the outcome of the job it was meant for.
        while True:
            try:
                while True:
                    try:
                        if not self._step():
                            return
                    except _INTERRUPTS as exc:
                        self._stray = exc
            except _INTERRUPTS as exc:
                self._stray = exc

    def _step(self) -> bool:
        stray, self._stray = self._stray, None
        if stray is not None:
            if self._turn is None:
                self._finish(None, stray)
            else:
                self._end_turn(self._turn, Batch([], False, stray))
        job = self._take()
        if job is None:
            return False
        stream = self._turn
        if stream is None:
            value, error = self._call(job)
            self._finish(value, error)
        elif self._limit:
            self._end_turn(stream, stream.produce(self._limit))
        else:
            self._end_turn(stream, Batch([], False, stream.shut(job.id)))
        return True

    def _take(self) -> Job[Any] | None:
        """The next job to call, or the job of the stream whose turn it is (``_turn``);
        None once the thread is to exit."""
        with self._lock:
            while True:
                if self._abandoned:
                    return None
                ending = self._closing and not self._pending
                stream = self._turns.choose(bool(self._pending), ending=ending)
                if stream is not None:
                    job = stream.job
                    self._limit = 0 if stream.closing else stream.limit()
                    break
                if self._pending:
                    job = self._pending.popleft()
                    if job.state is JobState.CANCELLED:
                        # cancelled by the host without a word to us: never started
                        self._post(_Event(_DONE, job, None, asyncio.CancelledError()))
                        continue
                    stream = None
                    soft_limits.soft_time_limit = job.soft_time_limit or 0.0
                    self._post(_Event(_STARTED, job))
                    break
                if self._closing:
                    return None
                self._wakeup.wait()
            self._current = job
            self._turn = stream
            self._fired = set()
            self._why = None
            self._coroutine_fn = stream is None and inspect.iscoroutinefunction(job.fn)
            self._started_at = time.perf_counter()
        return job

    def _call(self, job: Job[Any]) -> tuple[Any, BaseException | None]:
        """fn(*args), awaited if awaitable; for a stream, the iterator over what it gave."""
        result: Any = None
        try:
            self._started_at = time.perf_counter()
            result = job.fn(*job.args)
            if inspect.isawaitable(result):
                result = self._await(result)
            if job.stream is not None:
                return open_iterator(job.fn, result), None
            return result, None
        except BaseException as exc:
            if inspect.iscoroutine(result):
                result.close()  # an interrupt landed before it ran: never awaited
            return None, exc

    def _await(self, awaitable: Any) -> Any:
        with self._lock:
            # From here on an interrupt cancels the task (one raised now would land in the
            # thread's event loop); one fired at the call that made it is taken back here.
            raise_in(self._ident, None)
            self._coroutine_fn = True
        loop = self._private_loop()
        task = asyncio.ensure_future(awaitable, loop=loop)
        with self._lock:
            self._task = task
            if self._fired:
                task.cancel()
        return loop.run_until_complete(task)

    def _finish(self, value: Any, error: BaseException | None) -> None:
        """A call ended: post its outcome, or open the stream it returned."""
        run_time = time.perf_counter() - self._started_at
        with self._lock:
            raise_in(self._ident, None)  # none is sent while we hold the lock: none is left
            job = self._current
            if job is None:
                return
            self._current = None
            self._task = None
            if self._abandoned:
                return
            if job.stream is not None and error is None:
                stream = LiveIterator(job, value, job.stream.window, run_time)
                stream.closing = "cancel" in self._fired  # the interrupt came too late
                self._turns.add(stream)
                return
            self._post(_Event(_DONE, job, value, self._translate(job, error), run_time))

    def _end_turn(self, stream: LiveIterator[Job[Any]], batch: Batch) -> None:
        """A stream's turn ended: post its items, then its end if it ended or failed."""
        items, _, error = batch
        if error is not None:
            stream.discard()  # a generator that raised is closed already; an iterator not
        with self._lock:
            raise_in(self._ident, None)
            job = stream.job
            self._current = None
            self._turn = None
            if self._abandoned:
                return
            self._turns.end_turn(stream, batch)  # back of the line, or out
            if items:
                self._post(_Event(_ITEMS, job, items))
            if batch.over:
                self._post(_Event(_DONE, job, None, self._translate(job, error), stream.run_time))

    def _close_streams(self) -> None:
        """The thread exits: close the streams still open (their ``finally`` runs), as a
        process child does at EOF. They stay registered: the loop reports them lost."""
        with self._lock:
            streams = list(self._turns.live.values())
        for stream in streams:
            stream.discard()

    def _report(self, obj: Any) -> None:
        """``corral.report(obj)`` in a call: on to the loop, before the job's outcome."""
        with self._lock:
            job = self._current
            if job is None:
                raise RuntimeError("corral.report() was called outside a running task")
            if not self._abandoned:
                self._post(_Event(_REPORT, job, obj))

    def _translate(self, job: Job[Any], error: BaseException | None) -> BaseException | None:
        """A soft limit's interrupt (or its task's cancellation) as the caller sees it."""
        if isinstance(error, SoftLimitInterrupt) or (
            isinstance(error, asyncio.CancelledError) and self._why == "soft"
        ):
            soft = SoftTimeLimitExceeded(job.soft_time_limit or 0.0)
            if isinstance(error, SoftLimitInterrupt):
                soft.__context__ = error.__context__
                return soft.with_traceback(error.__traceback__)
            soft.__cause__ = error
            return soft
        return error

    def _post(self, event: _Event, call: Callable[..., object] | None = None) -> None:
        """Queue event for the loop, waking it once per batch; holds _lock."""
        self._outbox.append(event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if call is not None:
                call(self._flush)
            else:
                self._call_loop(self._flush)

    def _call_loop(self, fn: Callable[..., object], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: no one is left to tell
            loop.call_soon_threadsafe(fn, *args)

    def _private_loop(self) -> asyncio.AbstractEventLoop:
        if self._runner is None:
            self._runner = asyncio.Runner()
        return self._runner.get_loop()
