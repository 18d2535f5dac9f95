"""What a ``DaskWorker``'s Dask tasks send back to it: reports, starts, values, batches.

Why a module of its own: ``corral.workers._dask`` decides what to submit and when a job is
done; this is how the answers of the cluster reach it, and in which order. They take one of
two roads: events of the worker's topic, which the scheduler forwards as they are logged,
and the task's value, which waits on the cluster until it is fetched:

    a Dask worker thread                          the parent (the queue's event loop)
      corral.report(obj) ------ event --------->  on_event: counted, host.job_report
      a call with a hard limit starts: event -->  on_event: host.job_started
      a small outcome --------- event --------->  on_event: kept on its call
      the task ends (its value stays there) --->  value(call): the one kept, or fetched
                                                  with every other that ended meanwhile;
                                                  reports_in(call, sent): reports first

- Events are matched to calls by the key of their current Dask task (``expect``), so an
  event of a task given up, or of an earlier attempt, finds no call and is dropped.
- Reports: ``corral.report(obj)`` pickles obj and logs it as an event of the worker's
  topic; the scheduler forwards it ahead of the task's end (both travel in order on the
  same streams). The wrapper also returns how many it sent, and the outcome waits for
  that many, so reports always come first. The scheduler keeps the last
  ``distributed.admin.low-level-log-length`` events of a topic (1000): report small
  objects.
- Values: an outcome that pickles into ``PUSH_MAX`` bytes also travels ahead as an event,
  which saves fetching it; the others are fetched together, one gather for every task
  that ended meanwhile.
- A stream's pulls are pinned to the Dask worker that holds its generator, and a task
  pinned to a worker that is gone waits in the scheduler for ever: while a pull takes
  long, ``batch`` asks whether that worker is still there (see ``HOLDER_CHECK``).

Nothing here submits a task or finishes a job: it hands the outcome to ``_dask``, which does.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .._wire import ERROR, loads_outcome

# Until workers._dask imports it from _wire, where it now lives.
from ._dask_remote import NO_ITEMS, Batch, Pickled

if TYPE_CHECKING:
    from .._job import Job
    from ._base import Worker, WorkerHost

# How long an outcome waits for the reports its task says it sent. They travel ahead of it
# on the same streams, so this only bounds the wait when one was lost on the way.
REPORT_WAIT = 5.0

# A pull of a stream's next batch that takes longer than this makes us ask, again every
# this often, whether the Dask worker holding the generator is still there (it is pinned
# there, and a task pinned to a worker that is gone waits for ever). Short enough to end
# such a stream soon, long enough that a busy worker's pulls rarely cost the question.
HOLDER_CHECK = 1.0


class Call:
    """A job a DaskWorker holds: its Dask task, the task of the loop that awaits it, what
    that Dask task sent so far, and for a stream, its credit and where its generator lives.

    It lives here, below ``_dask``, because both modules read and write it."""

    __slots__ = (
        "address",
        "credit",
        "ended",
        "expected",
        "future",
        "handle",
        "job",
        "key",
        "launched",
        "more",
        "pushed",
        "released",
        "reports",
        "task",
        "waiter",
    )

    def __init__(self, job: Job[Any]) -> None:
        self.job = job
        self.key = ""  # of its current Dask task: a new one for each attempt and batch
        self.future: Any = None  # its distributed.Future
        self.task: asyncio.Task[None] | None = None
        self.launched = False  # submitted: it holds one of this worker's slots...
        self.released = False  # ...until the first items of its stream
        self.reports = 0  # reports received from the current Dask task
        self.expected = 0  # reports that task says it sent
        self.waiter: asyncio.Future[None] | None = None  # for the missing ones
        self.credit = 0  # items the stream may still send
        self.more: asyncio.Future[None] | None = None  # the stream waits for credit
        self.address: str | None = None  # the Dask worker holding the stream's generator
        self.handle = ""  # the key it is kept under there
        self.pushed: bytes | None = None  # the current task's outcome, sent as an event
        self.ended = True  # no generator left to close


class Outcomes:
    """Receives what one DaskWorker's Dask tasks send back; see the module docstring.

    Args:
        worker: the DaskWorker, as its host's calls name it.
        client: gives the worker's ``distributed.Client`` as it is now (None once the
            worker let go of it).
        spawn: starts a task of the loop that the worker waits for before it lets go of
            the cluster; the fetches run in such tasks.
    """

    def __init__(
        self,
        worker: Worker,
        client: Callable[[], Any],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        self.host: WorkerHost | None = None  # the worker's, from its start
        self._worker = worker
        self._client = client
        self._spawn = spawn
        self._by_key: dict[str, Call] = {}  # by the key of their current Dask task
        self._to_fetch: list[tuple[Any, asyncio.Future[Any]]] = []  # finished, not fetched
        self._fetching = False

    def expect(self, call: Call, key: str) -> None:
        """Take the events of call's new Dask task, submitted under key, and drop its last
        one's from now on."""
        self._by_key.pop(call.key, None)
        call.key = key
        call.reports = call.expected = 0
        call.pushed = None
        self._by_key[key] = call

    def forget(self, call: Call) -> None:
        """Drop the events of call's Dask task from now on: its job is done."""
        self._by_key.pop(call.key, None)

    def forget_all(self) -> None:
        """Drop every event from now on: the worker gave up every job."""
        self._by_key.clear()

    def on_event(self, event: tuple[float, Any]) -> None:
        """An event of the worker's topic: a report, a job with a time limit started, or a
        small outcome sent ahead of its task's end."""
        message = event[1]
        call = self._by_key.get(message[0])
        if call is None:
            return  # its job is done, or was given up
        host = self.host
        assert host is not None
        kind = message[1]
        if kind == "outcome":
            call.pushed = message[2]
            return
        if kind == "started":
            host.job_started(self._worker, call.job)
            return
        call.reports += 1
        waiter = call.waiter
        if waiter is not None and call.reports >= call.expected and not waiter.done():
            waiter.set_result(None)
        try:
            obj = pickle.loads(message[2], buffers=message[3])
        except Exception:
            return  # a report that will not unpickle here is dropped; the job goes on
        host.job_report(self._worker, call.job, obj)

    async def reports_in(self, call: Call, sent: int) -> None:
        """Wait (bounded) until the reports of call's task have all arrived."""
        if call.reports >= sent:
            return
        call.expected = sent
        call.waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(REPORT_WAIT):
                await call.waiter
        except TimeoutError:
            pass  # lost on the way: the outcome goes on without it
        finally:
            call.waiter = None

    async def value(self, call: Call) -> Any:
        """The value of call's current Dask task; raises what Dask raised for it. A small
        one came with the task's events, ahead of its end; others are fetched together: a
        task that ends while a fetch is on its way waits for the next, so a busy worker
        costs one round trip for many values, not one each."""
        future = call.future
        await future.exception()  # wait for the end, fetching nothing
        if future.status != "finished":
            return await future  # raises its error, or CancelledError, fetching nothing
        pushed, call.pushed = call.pushed, None
        if pushed is not None:
            return pushed, []
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._to_fetch.append((future, waiter))
        if not self._fetching:
            self._fetching = True
            self._spawn(self._fetch())
        return await waiter

    async def _fetch(self) -> None:
        """Fetch the values of finished tasks, as many at a time as are waiting."""
        try:
            while self._to_fetch:
                batch, self._to_fetch = self._to_fetch, []
                try:
                    values = await self._client().gather([future for future, _ in batch])
                except Exception:  # one will not come (its Dask worker died): each alone
                    for future, waiter in batch:
                        try:
                            value = await future
                        except Exception as exc:
                            if not waiter.done():
                                waiter.set_exception(exc)
                        else:
                            if not waiter.done():
                                waiter.set_result(value)
                    continue
                for (_, waiter), value in zip(batch, values, strict=True):
                    if not waiter.done():  # its job was cancelled meanwhile
                        waiter.set_result(value)
        finally:
            self._fetching = False

    async def batch(self, call: Call) -> Batch:
        """The outcome of the stream's current task. A pull pinned to a Dask worker that
        died would wait in the scheduler for ever, so while one takes longer than
        HOLDER_CHECK, whether that worker is still there is asked every HOLDER_CHECK; if it
        is not, the batch says so with no address."""
        batch: Batch
        if call.address is None:  # the opening: Dask reschedules it or says KilledWorker
            batch = await self.value(call)
            return batch
        waiter = asyncio.get_running_loop().create_task(self.value(call))
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=HOLDER_CHECK)
                if done:
                    batch = waiter.result()
                    return batch
                if not await self.holds(call.address):
                    return NO_ITEMS, True, None, 0.0, 0, None
        finally:
            waiter.cancel()

    async def holds(self, address: str) -> bool:
        """Whether the Dask worker at address is still in the cluster."""
        return address in await self._client().nthreads([address])


def load_error(payload: Pickled) -> BaseException:
    """The task's exception, its traceback in the Dask worker as its cause: the ERROR
    message ``dumps_error`` made there, decoded as a process worker's is."""
    data, buffers = payload
    _, error, _ = loads_outcome(ERROR, data, buffers=buffers)
    assert error is not None
    return error
