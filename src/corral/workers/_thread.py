"""``ThreadWorker``: jobs run in one dedicated daemon thread.

Why: a call that blocks (a synchronous client, file I/O, a C library that releases the GIL)
must not block the event loop, and needs no process: nothing is pickled, and the value or
the exception comes back as it is, traceback intact. One thread per worker, so a queue
decides how many calls run at once.

The loop and the thread meet under one lock, in three places::

    loop thread                                worker thread
      send()       -- _pending ------------->  _take(): pops a job, makes it current
      _flush()     <-- _outbox, one wake-up --  started / done events, batched
      _interrupt() -- async exception ------>  raised inside the running call

- One job at a time, in the order sent; every host callback is made in the loop's thread;
  ``run_time`` (seconds in the call) is set before ``job_done``. An awaitable result runs
  to its end on the thread's own event loop (made on first use, closed with the thread).
- Soft time limit (a timer of the loop, armed when the job starts): a plain call gets
  ``SoftTimeLimitExceeded`` raised inside it (``PyThreadState_SetAsyncExc``) and may catch
  it. A coroutine's task is cancelled instead (an asynchronous exception would land in the
  thread's event loop, not in the coroutine): it sees ``CancelledError``, and the caller
  gets ``SoftTimeLimitExceeded``.
- ``cancel``: a job not started never starts (``job_done`` with ``CancelledError``). A
  running one is interrupted the same way with ``asyncio.CancelledError``. An asynchronous
  exception lands only between bytecodes, so a call blocked in C (``time.sleep``, a socket
  read) or one that catches it runs on. If it is still running ``grace`` seconds later (at
  once when ``grace`` <= 0) the worker gives up: a thread cannot be killed, so it is
  abandoned (a daemon left to finish; its outcome is ignored), the worker is dead, and it
  reports ``worker_lost`` with the job as started and the rest as unstarted. The host puts a
  new worker in its place.
- ``stop`` finishes the jobs already sent; the thread's last act tells the loop, which then
  joins it without blocking. ``kill`` reports what it holds as lost at once, interrupts a
  running call (best effort) and does not wait for it (an idle thread exits at once).

Races: the loop interrupts only under the lock, and only the job still current. After a
call the thread takes the lock, withdraws any interrupt not yet raised, and clears the
current job, so none reaches a later step. One landing just outside the call escapes to the
serve loop, which reports it as that job's outcome; each kind fires at most once per job, so
two levels of handler there absorb every one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import inspect
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from .._errors import SoftTimeLimitExceeded, WorkerLostError, WorkerStartupError
from .._job import JobState
from ._base import Worker, WorkerHost

if TYPE_CHECKING:
    from .._job import Job

# See ``_local.CANCEL_GRACE``: time for a cancelled call's clean-up before it is abandoned.
CANCEL_GRACE = 1.0

# Our own prototype, so the argument types of ctypes.pythonapi's shared one stay untouched.
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


def _raise_in(ident: int, exc_type: type[BaseException] | None) -> None:
    """Have thread ident raise exc_type at its next bytecode; None withdraws one not yet raised."""
    _set_async_exc(ident, ctypes.py_object() if exc_type is None else ctypes.py_object(exc_type))


_running = threading.local()  # in a worker thread: soft_time_limit of the call running now


class _SoftLimitInterrupt(SoftTimeLimitExceeded):
    """``SoftTimeLimitExceeded`` as an asynchronous exception: that path raises a class,
    instantiated without arguments in the target thread, so the limit is read from there.
    The caller gets a plain ``SoftTimeLimitExceeded`` (see ``_translate``)."""

    def __init__(self) -> None:
        super().__init__(getattr(_running, "soft_time_limit", 0.0))

    def __reduce__(self) -> tuple[object, ...]:
        return (SoftTimeLimitExceeded, (self.limit,), self.__dict__)


_INTERRUPTS = (asyncio.CancelledError, SoftTimeLimitExceeded)


class _Event(NamedTuple):
    """What the thread tells the loop: a job started, or ended with value or error."""

    job: Job[Any]
    done: bool
    value: Any = None
    error: BaseException | None = None
    run_time: float | None = None


class ThreadState(enum.Enum):
    """Life of a thread worker, as the loop sees it."""

    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    DEAD = "dead"


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
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, not {initializer!r}")
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self.state = ThreadState.NEW
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
        self._current: Job[Any] | None = None
        self._fired: set[str] = set()  # interrupts sent to the current job
        self._why: str | None = None  # "soft" or "cancel": what the current job was told
        self._coroutine_fn = False  # the current job's task will be cancelled, not raised in
        self._task: asyncio.Future[Any] | None = None  # its task on the thread's loop
        # The thread's own:
        self._runner: asyncio.Runner | None = None  # its event loop, for awaitables
        self._started_at = 0.0
        self._stray: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self.state in (ThreadState.STARTING, ThreadState.READY, ThreadState.STOPPING)

    async def start(self, host: WorkerHost) -> None:
        """Start the thread and run the initializer in it; raises ``WorkerStartupError``
        (its exception as the cause) when it raises, once the thread has ended."""
        if self.state is not ThreadState.NEW:
            raise RuntimeError(f"cannot start {self.name}: it is {self.state.value}")
        loop = self._loop = asyncio.get_running_loop()
        self._host = host
        self._up = loop.create_future()
        self._ended = loop.create_future()
        self._exited = loop.create_future()
        self.state = ThreadState.STARTING
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
        if self.state is not ThreadState.STARTING:
            raise WorkerStartupError(1, f"{self.name} was stopped before it started")
        self.state = ThreadState.READY

    def send(self, job: Job[Any]) -> None:
        if self.state is not ThreadState.READY:
            raise RuntimeError(f"cannot send to {self.name}: it is {self.state.value}")
        if job.state is not JobState.CANCELLED:  # one already cancelled never starts
            job.state = JobState.SENT
        self.tasks_sent += 1
        with self._lock:
            self._pending.append(job)
            self._wakeup.notify()

    def cancel(self, job: Job[Any], *, grace: float = CANCEL_GRACE) -> None:
        """Stop job: one not started never starts; a running one gets ``CancelledError``,
        and the thread is abandoned if it still runs after grace seconds (0: at once)."""
        loop = self._loop
        if loop is None or self.state is ThreadState.DEAD:
            return
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
                self._post(_Event(job, True, None, asyncio.CancelledError()), loop.call_soon)
                return
            if job is not self._current:
                return  # done, or not ours
            if grace > 0:
                self._interrupt_locked("cancel")
        if job not in self._overdue:  # grace <= 0: given up on one loop turn from now
            self._overdue[job] = loop.call_later(max(grace, 0.0), self._still_running, job, grace)

    async def stop(self) -> None:
        if self.state in (ThreadState.NEW, ThreadState.DEAD):
            return
        assert self._ended is not None
        if self.state is not ThreadState.STOPPING:
            self.state = ThreadState.STOPPING
            self._close()
        await asyncio.shield(self._ended)

    async def kill(self) -> None:
        if self.state in (ThreadState.NEW, ThreadState.DEAD):
            return
        assert self._exited is not None
        with self._lock:
            idle = self._current is None and self.state is not ThreadState.STARTING
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
            _raise_in(
                self._ident, asyncio.CancelledError if kind == "cancel" else _SoftLimitInterrupt
            )

    def _still_running(self, job: Job[Any], grace: float) -> None:
        self._overdue.pop(job, None)
        reason = f"job {job.id} was still running {grace:g} s after it was cancelled"
        self._give_up(job, f"{reason}; its thread was abandoned")

    def _flush(self) -> None:
        with self._lock:
            events, self._outbox = self._outbox, []
            self._flush_scheduled = False
        self._deliver(events)

    def _deliver(self, events: list[_Event]) -> None:
        host, loop = self._host, self._loop
        assert host is not None and loop is not None
        for event in events:
            job = event.job
            if not event.done:
                if job.state is JobState.SENT:
                    job.state = JobState.RUNNING
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
            self.tasks_done += 1
            host.job_done(self, job, event.value, event.error)

    def _give_up(self, job: Job[Any] | None, reason: str) -> None:
        """Die now, abandoning the thread: report what it held (job: only if that job is
        still the one running). Outcomes it posted before still count, and come first."""
        if self.state is ThreadState.DEAD:
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
        self._deliver(events)  # the host may send more: they join _pending, collected next
        with self._lock:
            unstarted = list(self._pending)
            self._pending.clear()
        self._end()
        started = [running] if running is not None else []
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
        if self.state is not ThreadState.DEAD:
            self._give_up(None, "its thread ended unexpectedly")  # reports nothing if idle
        self._end()

    def _end(self) -> None:
        self.state = ThreadState.DEAD
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
            if self._initialize():
                self._serve()
        finally:
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
            self._finish(None, stray)
        job = self._take()
        if job is None:
            return False
        value, error = self._call(job)
        self._finish(value, error)
        return True

    def _take(self) -> Job[Any] | None:
        with self._lock:
            while True:
                while not (self._pending or self._closing):
                    self._wakeup.wait()
                if self._abandoned or not self._pending:
                    return None
                job = self._pending.popleft()
                if job.state is not JobState.CANCELLED:
                    break
                # cancelled by the host without a word to us: never started
                self._post(_Event(job, True, None, asyncio.CancelledError()))
            self._current = job
            self._fired = set()
            self._why = None
            self._coroutine_fn = inspect.iscoroutinefunction(job.fn)
            self._started_at = time.perf_counter()
            _running.soft_time_limit = job.soft_time_limit or 0.0
            self._post(_Event(job, False))
        return job

    def _call(self, job: Job[Any]) -> tuple[Any, BaseException | None]:
        result: Any = None
        try:
            self._started_at = time.perf_counter()
            result = job.fn(*job.args)
            if inspect.isawaitable(result):
                return self._await(result), None
            return result, None
        except BaseException as exc:
            if inspect.iscoroutine(result):
                result.close()  # an interrupt landed before it ran: never awaited
            return None, exc

    def _await(self, awaitable: Any) -> Any:
        with self._lock:
            # From here on an interrupt cancels the task (one raised now would land in the
            # thread's event loop); one fired at the call that made it is taken back here.
            _raise_in(self._ident, None)
            self._coroutine_fn = True
        loop = self._private_loop()
        task = asyncio.ensure_future(awaitable, loop=loop)
        with self._lock:
            self._task = task
            if self._fired:
                task.cancel()
        return loop.run_until_complete(task)

    def _finish(self, value: Any, error: BaseException | None) -> None:
        run_time = time.perf_counter() - self._started_at
        with self._lock:
            _raise_in(self._ident, None)  # none is sent while we hold the lock: none is left
            job = self._current
            if job is None:
                return
            self._current = None
            self._task = None
            if not self._abandoned:
                self._post(_Event(job, True, value, self._translate(job, error), run_time))

    def _translate(self, job: Job[Any], error: BaseException | None) -> BaseException | None:
        """A soft limit's interrupt (or its task's cancellation) as the caller sees it."""
        if isinstance(error, _SoftLimitInterrupt) or (
            isinstance(error, asyncio.CancelledError) and self._why == "soft"
        ):
            soft = SoftTimeLimitExceeded(job.soft_time_limit or 0.0)
            if isinstance(error, _SoftLimitInterrupt):
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
