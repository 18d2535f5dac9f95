"""``DaskWorker``: jobs run as tasks of a dask.distributed cluster.

Why: the same queue, with its priorities, series, errors, reports and streams, can send its
calls to many machines. The cluster's scheduler and workers do the running; this worker is
the queue's side of one ``distributed.Client`` (asynchronous, on the queue's event loop).

How it keeps the ``Worker`` contract (``corral.workers._base``):

    parent (the queue's event loop)                 a Dask worker thread
      send(job) --- client.submit(run_call) ---->  fn(*args), in a small wrapper
        one loop task per job awaits its future     corral.report(obj) -> log_event
      outcomes  <-- events of this worker's topic   reports; "started" (hard limit);
                    (through the scheduler) ------  a small outcome, sent ahead
      job_done  <-- the outcome: sent ahead, or fetched with others' -- returned, not raised

What comes back (events, values, a stream's batches, and in which order) is received by
``Outcomes``, in ``corral.workers._dask_outcomes``; this module decides what to submit and
when a job is done.

- Calls: ``client.submit(run_call, fn, args, ..., pure=False, priority=-job.priority)``:
  corral runs a lower number sooner, Dask a higher one. A job's ``series`` becomes the
  Dask resource ``{series: 1}``: only Dask workers that declare it (``dask worker
  --resources "gpu=1"``, ``Nanny(resources={"gpu": 1})``) run the job, and a job whose
  series no Dask worker declares waits in the scheduler until one joins. The wrapper
  catches the task's exception and returns it pickled with its formatted traceback, so
  it reaches the caller as the same type with a ``RemoteTraceback`` as its cause; it
  measures ``run_time`` around the call. It pickles the outcome itself (Dask handles a
  Python container item by item, several times slower), so a result that will not
  pickle fails with ``SerializationError`` naming it. A small outcome travels ahead as
  an event; the others are fetched together (see ``_dask_outcomes``).
- Cores: the host decides how many jobs this worker holds (1 under ``strategy="fair"``,
  ``prefetch`` under ``"prefetch"``, per job under ``"auto"``), and it keeps that many on
  the cluster. To use a cluster's n threads, attach one DaskWorker under
  ``strategy="prefetch", prefetch=n`` (or more: Dask's scheduler then orders the tasks
  waiting for a thread by their Dask priority, and the round trip of one job hides behind
  the others), or n DaskWorkers that share one client under ``"fair"`` (corral orders
  every job and Dask sees one task per thread, at the cost of a round trip per job), which
  is what ``Pool(cluster=...)`` does. ``slots`` caps the tasks this worker keeps on the
  cluster below the host's capacity; jobs sent beyond it wait here, in the order sent
  (cancelled here at no cost).
- Dask workers lost: one that dies mid-task makes Dask reschedule the task up to
  ``distributed.scheduler.allowed-failures`` times (3 by default) before it gives up with
  ``KilledWorker``; this worker then runs the job again while ``job.retries`` > 0
  (decrementing it), else fails it with ``WorkerLostError``. Set allowed-failures to 0 to
  let corral alone decide. The DaskWorker lives on: one Dask worker is one of many. It
  dies (``worker_lost``, every submitted job counted as started, since it may be
  running) only when its client loses the scheduler: at once if a task of its is on the
  cluster (the client cancels it); else a job sent while the client reconnects waits
  for it (the client's ``timeout``), then fails the same way; once the client has given
  up, the next job sent goes back to the host unsent, and a stream's next pull ends it.
- Cancellation: a job waiting here never starts. A submitted one is released with
  ``client.cancel``: Dask drops it if it has not started, but it cannot interrupt a
  running thread, so a running call goes on to its end and its outcome is dropped. The
  caller gets ``CancelledError`` and the slot is freed at once (``job_done``): a stuck
  call holds a thread of the cluster, never a slot of the queue; but the scheduler,
  which thinks that thread free, may give its Dask worker another task, which then waits
  for the call to return. A hard time limit is the same: the host's timer (armed when
  the wrapper announces the start) gives the caller ``TimeLimitExceeded`` on time, the
  task is released, and the Dask thread runs until the function returns. A soft limit
  is raised inside the call (an asynchronous exception, as in ``ThreadWorker``: a call
  blocked in C sees it once it is back in Python).
- Reports: ``corral.report(obj)`` travels as an event of this worker's topic, and always
  reaches the host before the job's outcome (see ``_dask_outcomes``).
- Streams (``iterate``) are pulled a batch per Dask task: the first calls fn, keeps the
  iterator in a table of its Dask worker process and returns the first items; each next
  one, pinned to that Dask worker, takes as many items as the stream's credit allows (at
  most ``BATCH_ITEMS``, or what five ``BATCH_SECONDS`` of a slow generator give). So credit
  is exact, the parent holds at most a window of items, and no Dask thread is held while
  the consumer is slow. Closing a stream closes its generator there (its ``finally``
  runs). A stream whose Dask worker died ends with ``WorkerLostError`` (a pull that takes
  long makes us ask whether that worker is still there: see ``_dask_outcomes``).
- Requirements: corral must be importable on the Dask workers, from the same version as
  here: they run the wrapper and the stream's tasks, which are pickled by reference and
  live in ``corral.workers._dask_remote``. Dask is imported only when a DaskWorker is
  made; without it that raises ``ImportError`` saying ``pip install 'corral[dask]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from .._checks import check_count
from .._errors import SerializationError, WorkerLostError, WorkerStartupError
from .._job import JobState, take_retry
from .._streaming import BATCH_ITEMS
from .._wire import call_error, describe, unpickling_failed
from ._base import CANCEL_GRACE, Worker, WorkerHost, WorkerState
from ._dask_outcomes import Call, Outcomes, load_error
from ._dask_remote import (
    Batch,
    close_stream,
    distributed_module,
    open_stream,
    pull_stream,
    run_call,
    unpickled,
)

if TYPE_CHECKING:
    from .._job import Job

# How long letting go of a job's Dask task (``client.cancel``) may take before we give up
# on it: a scheduler that does not answer must not hang ``stop`` or ``kill``.
RELEASE_WAIT = 5.0

# How long an address given to DaskWorker may take to connect.
CONNECT_TIMEOUT = 30.0

# Why a DaskWorker died, and its jobs with it, when its client lost the scheduler.
LOST_SCHEDULER = "its Dask client lost the scheduler"

# What a client given to corral must be, and the way round it.
_CLIENT_NEEDED = (
    "corral needs a distributed.Client made with asynchronous=True on the event loop the "
    "queue runs on (`await distributed.Client(address, asynchronous=True)`), or the "
    "scheduler's address, for which it makes a client of its own"
)


class DaskWorker(Worker):
    """Runs jobs on a dask.distributed cluster; see the module docstring.

    Args:
        client_or_address: a ``distributed.Client`` made with ``asynchronous=True`` on the
            queue's event loop (shared, left open), or a scheduler address
            (``"tcp://host:8786"``), for which this worker makes its own client and closes
            it when it stops.
        series: the series of jobs the host sends it (None: all). A job's own series is
            sent to Dask as the resource ``{series: 1}``, which the cluster's workers must
            declare.
        name: what errors and stats call it.
        slots: the most tasks it keeps on the cluster at once (None: as many as the host
            sends it); jobs sent beyond that wait here, in order.
    """

    kind = "dask"

    def __init__(
        self,
        client_or_address: Any,
        *,
        series: Iterable[str] | None = None,
        name: str | None = None,
        slots: int | None = None,
    ) -> None:
        super().__init__(series=series, name=name)
        check_target(client_or_address)
        check_count("slots", slots, optional=True)
        self.slots = slots
        self._target: Any = client_or_address
        self._client: Any = None
        self._owns_client = isinstance(client_or_address, str)
        self._host: WorkerHost | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._topic = f"corral-{uuid.uuid4().hex}"  # its events; the prefix of its keys
        self._calls: dict[Job[Any], Call] = {}  # held, in the order sent
        self._waiting: deque[Call] = deque()  # sent beyond slots, not yet submitted
        self._active = 0  # calls holding a slot
        self._tasks: set[asyncio.Task[None]] = set()  # every awaiting task, until it ends
        self._idle: asyncio.Event | None = None  # set while it holds no job
        self._serial = 0
        self._outcomes = Outcomes(self, lambda: self._client, self._spawn)

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` it uses (None before ``start``)."""
        return self._client

    async def start(self, host: WorkerHost) -> None:
        """Connect (or check the client given), and listen for the reports of its tasks.

        Raises ``WorkerStartupError`` when the scheduler cannot be reached, or when the
        client given is not asynchronous on this event loop."""
        if self.state is not WorkerState.NEW:
            raise RuntimeError(f"cannot start {self.name}: it is {self.state.value}")
        self._loop = asyncio.get_running_loop()
        self._host = self._outcomes.host = host
        self._idle = asyncio.Event()
        self._idle.set()
        self.state = WorkerState.STARTING
        distributed = distributed_module()
        try:
            if self._owns_client:
                try:
                    self._client = await distributed.Client(
                        self._target, asynchronous=True, timeout=CONNECT_TIMEOUT
                    )
                except (OSError, TimeoutError) as exc:
                    raise WorkerStartupError(
                        1, f"could not connect to the Dask scheduler at {self._target}: {exc}"
                    ) from exc
            else:
                await open_client(self._target)
                self._client = self._target
            self._client.subscribe_topic(self._topic, self._outcomes.on_event)
        except BaseException:
            await self._disconnect()
            self.state = WorkerState.DEAD
            raise
        if self.state is not WorkerState.STARTING:  # killed while it connected
            await self._disconnect()
            raise WorkerStartupError(1, f"{self.name} was stopped before it started")
        self.state = WorkerState.READY

    def send(self, job: Job[Any]) -> None:
        """Submit job to the cluster (or keep it until a slot frees); raises
        ``SerializationError`` naming the part of the call that would not pickle."""
        if self.state is not WorkerState.READY:
            raise RuntimeError(f"cannot send to {self.name}: it is {self.state.value}")
        call = Call(job)
        if self._client_closed():
            # It gave up reconnecting to a lost scheduler, and this worker, holding no
            # task, was not told. The job never left: held, it is handed back as unstarted
            # once this call has returned to the host.
            assert self._loop is not None
            self._hold(call)
            self._loop.call_soon(self._lose_client)
            return
        if self.slots is not None and self._active >= self.slots:
            self._hold(call)
            self._waiting.append(call)
            return
        self._launch(call)  # may raise: then the host fails the job, which we never held
        self._hold(call)

    def credit(self, job: Job[Any], n: int) -> None:
        """The consumer took n items: the stream may pull n more."""
        call = self._calls.get(job)
        if call is None:
            return
        call.credit += n
        more = call.more
        if more is not None and not more.done():
            more.set_result(None)

    def cancel(self, job: Job[Any], *, grace: float = CANCEL_GRACE) -> None:
        """Release job: the caller gets ``CancelledError`` (or the host's error) at once.
        A job waiting for a slot never runs; a submitted one is cancelled in Dask, which
        drops it if it has not started and otherwise lets the call run to its end (Dask
        cannot interrupt a thread); a stream's generator is closed. grace is not used:
        nothing waits for the call."""
        call = self._calls.get(job)
        if call is None:
            return
        if call in self._waiting:
            self._waiting.remove(call)
        elif call.task is not None:
            call.task.cancel()  # it cancels the Dask task as it ends
        self._finish(call, None, asyncio.CancelledError())

    async def stop(self) -> None:
        """Finish the jobs already sent, then let go of the cluster (closing the client it
        made)."""
        if self.state is WorkerState.NEW:
            return
        if self.state is not WorkerState.DEAD:
            assert self._idle is not None
            self.state = WorkerState.STOPPING
            await self._idle.wait()  # a lost client makes it DEAD, and idle, meanwhile
            self.state = WorkerState.DEAD
        await self._drain()
        await self._disconnect()

    async def kill(self) -> None:
        """Report every job held as lost (those submitted as started: they may be running),
        cancel their Dask tasks and let go of the cluster."""
        if self.state is WorkerState.NEW:
            return
        self._die(WorkerLostError(self.name, detail="it was killed by its owner"))
        await self._drain()
        await self._disconnect()

    # -- in the loop ----------------------------------------------------------------------

    def _hold(self, call: Call) -> None:
        job = call.job
        self._calls[job] = call
        assert self._idle is not None
        self._idle.clear()

    def _launch(self, call: Call) -> None:
        """Submit call's first Dask task and start the task of the loop that awaits it."""
        self._first_task(call)
        call.launched = True
        self._active += 1
        call.task = self._spawn(self._drive(call))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start a task of the loop that ``stop`` and ``kill`` wait for (``_drain``)."""
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _first_task(self, call: Call) -> None:
        """Submit the call itself (again, for a retry), or the opening of its stream."""
        job = call.job
        key = self._new_key(job)
        if job.stream is None:
            self._submit(
                call,
                key,
                run_call,
                job.fn,
                job.args,
                (self._topic, key),
                # Announce the start (the hard limit counts from the first one).
                job.time_limit is not None and job.state is not JobState.RUNNING,
                job.soft_time_limit,
            )
        else:
            call.credit = job.stream.window
            where = (self._topic, key)
            self._submit(call, key, open_stream, job.fn, job.args, where, _batch(call))

    def _new_key(self, job: Job[Any]) -> str:
        """A key no other Dask task has: the function's name (Dask's dashboard groups by
        it), then this worker's topic, the job and a serial number."""
        self._serial += 1
        fn = getattr(job.fn, "func", job.fn)  # a functools.partial: the function's name
        name = getattr(fn, "__name__", "call")
        return f"{name}-{self._topic}-{job.id}-{self._serial}"

    def _submit(
        self, call: Call, key: str, fn: Callable[..., Any], *args: Any, **options: Any
    ) -> None:
        job = call.job
        try:
            call.future = self._client.submit(
                fn,
                *args,
                key=key,
                pure=False,
                priority=-job.priority,  # corral: lower sooner; Dask: higher sooner
                resources=None if job.series is None else {job.series: 1},
                retries=0,
                **options,
            )
        except Exception as exc:
            if self._client_closed():  # a stream's next pull, a job held back: not the call
                self._lose_client()
                raise WorkerLostError(self.name, detail=LOST_SCHEDULER) from exc
            raise call_error(job.fn, job.args, exc) from exc
        self._outcomes.expect(call, key)

    async def _drive(self, call: Call) -> None:
        """Await call's Dask tasks and report the outcome; let go of them when it ends."""
        try:
            if call.job.stream is None:
                await self._serve_call(call)
            else:
                await self._serve_stream(call)
        except asyncio.CancelledError:
            pass  # cancel() or kill(), which reported the job
        except Exception as exc:  # not the task's own error: the caller must not wait
            self._finish(call, None, exc)
        finally:
            await self._let_go(call)

    async def _serve_call(self, call: Call) -> None:
        job = call.job
        while True:
            try:
                outcome = await self._outcomes.value(call)
                break
            except Exception as exc:
                error = self._translate(exc, job)
                if isinstance(error, WorkerLostError) and self._connected() and take_retry(job):
                    self._first_task(call)
                    continue
                self._finish(call, None, error)
                return
        try:
            ok, payload, run_time, sent = unpickled(outcome)
        except Exception as exc:
            self._finish(call, None, unpickling_failed("the result", exc))
            return
        await self._outcomes.reports_in(call, sent)
        job.run_time = run_time
        if ok:
            self._finish(call, payload, None)
        else:
            self._finish(call, None, load_error(payload))

    async def _serve_stream(self, call: Call) -> None:
        job = call.job
        call.handle = call.key  # the key its generator is kept under
        while True:
            try:
                batch: Batch = await self._outcomes.batch(call)
            except Exception as exc:
                self._finish(call, None, self._translate(exc, job))
                return
            blob, ended, failure, run_time, sent, address = batch
            if address is None:
                self._finish(call, None, self._holder_gone())
                return
            try:
                items = unpickled(blob)
            except Exception as exc:
                self._finish(call, None, unpickling_failed("items of the stream", exc))
                return
            call.address = address
            call.ended = ended or failure is not None  # then no generator is left there
            await self._outcomes.reports_in(call, sent)
            job.run_time = (job.run_time or 0.0) + run_time
            if items or not call.released:
                call.credit -= len(items)
                if not call.released:  # the first items free the slot, as the host's
                    call.released = True
                    self._active -= 1
                    self._fill()
                assert self._host is not None
                self._host.job_items(self, job, items)
                if job not in self._calls:
                    return  # the consumer left at once
            if failure is not None:
                self._finish(call, None, load_error(failure))
                return
            if ended:
                self._finish(call, None, None)
                return
            while call.credit <= 0:
                assert self._loop is not None
                call.more = self._loop.create_future()
                await call.more
            key = self._new_key(job)
            self._submit(
                call,
                key,
                pull_stream,
                (self._topic, key),
                call.handle,
                _batch(call),
                workers=[address],  # strictly: a task free to go elsewhere may be stolen
            )

    def _holder_gone(self) -> WorkerLostError:
        detail = "the Dask worker that held its generator is gone"
        return WorkerLostError(self.name, detail=detail)

    def _translate(self, exc: Exception, job: Job[Any]) -> BaseException:
        """A failure of a Dask task as the caller sees it: Dask's own, since the wrapper
        returns the task's exceptions instead of raising them."""
        distributed = distributed_module()
        if isinstance(exc, distributed.KilledWorker):
            return WorkerLostError(self.name, detail=f"the Dask worker running it died: {exc}")
        if isinstance(exc, distributed.CancelledError | OSError):
            if not self._connected():
                self._lose_client()
            return WorkerLostError(self.name, detail=f"Dask dropped its task: {exc!r}")
        # What remains happened before the wrapper ran: unpickling the call in the Dask
        # worker (a module missing there, ...).
        error = SerializationError(
            f"the call of {describe(job.fn)}", "in the Dask worker", f"{type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        return error

    def _finish(self, call: Call, value: Any, error: BaseException | None) -> None:
        """Report call's outcome, once; its slot goes first to a job waiting here."""
        job = call.job
        if self._calls.pop(job, None) is None:
            return
        self._outcomes.forget(call)
        if call.launched and not call.released:
            call.released = True
            self._active -= 1
        if not self._calls:
            assert self._idle is not None
            self._idle.set()
        self._fill()
        assert self._host is not None
        self._host.job_done(self, job, value, error)

    def _fill(self) -> None:
        """Submit the jobs waiting here while slots are free."""
        while self._waiting and (self.slots is None or self._active < self.slots):
            call = self._waiting.popleft()
            try:
                self._launch(call)
            except Exception as exc:
                self._finish(call, None, exc)

    async def _let_go(self, call: Call) -> None:
        """Cancel call's Dask task if it is not done, and close its stream's generator."""
        future, call.future = call.future, None
        client = self._client
        if future is not None and not future.done():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(RELEASE_WAIT):
                    await client.cancel([future], reason="cancelled by corral")
        if call.address is not None and not call.ended:
            # A task pinned to a Dask worker that is gone would wait for ever: ask first.
            call.ended = True
            with contextlib.suppress(Exception):  # the client is closed: nothing to close
                async with asyncio.timeout(RELEASE_WAIT):
                    if await self._outcomes.holds(call.address):
                        distributed_module().fire_and_forget(
                            client.submit(
                                close_stream,
                                call.handle,
                                key=f"close-{call.handle}",
                                pure=False,
                                workers=[call.address],
                            )
                        )

    def _connected(self) -> bool:
        return self._client is not None and self._client.status == "running"

    def _client_closed(self) -> bool:
        """Its client gave up reconnecting to a lost scheduler (or its owner closed it):
        nothing submitted through it will run."""
        return self._client is None or self._client.status in ("closing", "closed")

    def _lose_client(self) -> None:
        """The client lost the scheduler: this worker is dead; what it held is lost."""
        if self.state is WorkerState.DEAD:
            return  # killed, or lost already
        self._die(WorkerLostError(self.name, detail=LOST_SCHEDULER))
        if self._owns_client and self._loop is not None:
            self._spawn(self._disconnect())

    def _die(self, error: WorkerLostError) -> None:
        """Give up every job held: reported lost (as started once submitted: it may run)."""
        if self.state is WorkerState.DEAD:
            return
        self.state = WorkerState.DEAD
        calls = list(self._calls.values())
        self._calls.clear()
        self._outcomes.forget_all()
        self._waiting.clear()
        self._active = 0
        if self._idle is not None:
            self._idle.set()
        current = asyncio.current_task()
        for call in calls:
            if call.task is not None and call.task is not current:
                call.task.cancel()
        unstarted = [call.job for call in calls if not call.launched]
        started = [call.job for call in calls if call.launched]
        if self._host is not None and (unstarted or started):
            self._host.worker_lost(self, error, unstarted, started)

    async def _drain(self) -> None:
        """Wait for the tasks awaiting Dask tasks to end (each lets go of its own)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _disconnect(self) -> None:
        client = self._client
        if client is None:
            return
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(self._topic)
        if self._owns_client:
            self._client = None
            with contextlib.suppress(Exception):
                await client.close()


def check_target(client_or_address: Any) -> None:
    """What a DaskWorker (or ``Pool(cluster=...)``) connects through is a scheduler
    address or an asynchronous ``distributed.Client``: ``ImportError`` with the fix when
    Dask is missing, ``TypeError`` for anything else, ``ValueError`` for a synchronous
    client (it would block the event loop). Checked where the target is given."""
    if not isinstance(client_or_address, str | distributed_module().Client):
        raise TypeError(
            "DaskWorker takes a distributed.Client or a scheduler address such as "
            f"'tcp://127.0.0.1:8786' (of a LocalCluster: its .scheduler_address), "
            f"not {client_or_address!r}"
        )
    # A client's ``asynchronous`` is also False away from its own loop: made elsewhere, it
    # could not serve this one.
    if not isinstance(client_or_address, str) and not client_or_address.asynchronous:
        raise ValueError(f"{_CLIENT_NEEDED}; {client_or_address!r} is not asynchronous here")


async def open_client(client: Any) -> None:
    """Check, as a worker starts, that the client given serves this event loop and is
    open (a client not started yet is started): else ``WorkerStartupError`` saying why.
    A client reconnecting to its scheduler passes: its calls wait for the reconnection."""
    if client.loop.asyncio_loop is not asyncio.get_running_loop():
        raise WorkerStartupError(1, f"{_CLIENT_NEEDED}; this one belongs to another event loop")
    if client.status not in ("running", "connecting"):
        await client  # starts a client not started yet
    if client.status not in ("running", "connecting"):  # awaiting a closed one returns at once
        raise WorkerStartupError(
            1,
            f"its Dask client is {client.status}: it was closed, or it lost the "
            "scheduler and gave up reconnecting; pass an open one",
        )


def _batch(call: Call) -> int:
    """How many items the stream's next batch may have."""
    return max(1, min(call.credit, BATCH_ITEMS))
