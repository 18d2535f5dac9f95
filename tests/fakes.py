"""A worker that runs nothing: the test scripts what it does, so the queue's rules (loss,
redelivery, retirement, broadcast replay, dispatch order) are tested without processes,
threads or timing.

``ScriptedWorker`` keeps the ``Worker`` contract (``corral.workers._base``) and no more: it
holds the jobs it is sent, in order, and calls its host's callbacks only when the test says
so, synchronously, in the loop. It writes no ``job.state``, no ``job.run_time`` and no
counter: the queue owns those, and a rule that leaned on a worker's bookkeeping would fail
here. Every script step checks that the step is one a real worker could take (a job it
holds, a worker alive), so a test cannot script an impossible history::

    worker = ScriptedWorker()
    await queue.attach(worker)
    job = queue.submit(f)            # the queue sends it: worker.held == [job]
    worker.acknowledge(job)          # job_started
    worker.finish(job, 42)           # job_done(value=42)
    worker.die()                     # worker_lost: what it held, unstarted ones first in order
"""

from __future__ import annotations

import asyncio
from typing import Any

import corral
from corral import Job
from corral.workers import Worker
from corral.workers._base import WorkerHost, WorkerState

BOUND = 10.0  # seconds a wait for the queue's next move may take


class ScriptedWorker(Worker):
    """A worker whose every move is the test's. See the module docstring.

    Args:
        series: the series it serves (None: all).
        name: what errors and stats call it.
        fails_to_start: ``start`` raises this (``WorkerStartupError``) instead of serving.
    """

    kind = "scripted"

    def __init__(
        self,
        *,
        series: list[str] | None = None,
        name: str | None = None,
        fails_to_start: corral.WorkerStartupError | None = None,
    ) -> None:
        super().__init__(series=series, name=name)
        self._fails_to_start = fails_to_start
        self._host: WorkerHost | None = None
        self.held: list[Job[Any]] = []  # sent and not yet finished, in the order sent
        self.received: list[Job[Any]] = []  # every job ever sent, in order
        self.begun: set[Job[Any]] = set()  # acknowledged (job_started) among held
        self.cancels: list[tuple[Job[Any], float]] = []  # cancel(job, grace) calls, in order
        self.stop_called = False
        self._changed = asyncio.Event()  # set at each send or end, for ``until``
        self._gone = asyncio.Event()

    # -- the Worker contract --------------------------------------------------------------

    async def start(self, host: WorkerHost) -> None:
        """Serve host at once, or raise the startup error the test gave."""
        if self.state is not WorkerState.NEW:
            raise RuntimeError(f"cannot start {self.name}: it is {self.state.value}")
        self._host = host
        if self._fails_to_start is not None:
            self._end()
            raise self._fails_to_start
        self.state = WorkerState.READY

    def send(self, job: Job[Any]) -> None:
        """Hold job until the script ends it."""
        if self.state is not WorkerState.READY:
            raise RuntimeError(f"cannot send to {self.name}: it is {self.state.value}")
        self.held.append(job)
        self.received.append(job)
        self._changed.set()

    def cancel(self, job: Job[Any], *, grace: float = 1.0) -> None:
        """A held job not begun is dropped at once (``job_done`` with ``CancelledError``),
        as every kind does; a begun one is the script's to end (``finish`` or ``die``)."""
        if job not in self.held:
            return
        self.cancels.append((job, grace))
        if job not in self.begun:
            self.finish(job, error=asyncio.CancelledError())

    async def stop(self) -> None:
        """Stop once the script has ended every job held (or the worker died)."""
        self.stop_called = True
        if self.state is WorkerState.NEW:
            self.state = WorkerState.DEAD
            return
        if self.state is WorkerState.READY:
            self.state = WorkerState.STOPPING
        while self.held and self.state is not WorkerState.DEAD:
            self._changed.clear()
            await self._changed.wait()
        self._end()

    async def kill(self) -> None:
        """End now; whatever it held is reported lost (begun as started)."""
        if self.state is WorkerState.NEW:
            self.state = WorkerState.DEAD
            return
        if self.state is not WorkerState.DEAD:
            self.die(corral.WorkerLostError(self.name, detail="it was killed by its owner"))

    def may_have_started(self, job: Job[Any]) -> bool:
        """Only what the script acknowledged has begun."""
        return job in self.begun

    # -- the script -----------------------------------------------------------------------

    def acknowledge(self, job: Job[Any]) -> None:
        """The held job begins: ``job_started``."""
        self._check_holds(job)
        self.begun.add(job)
        self._callbacks().job_started(self, job)

    def finish(
        self, job: Job[Any], value: Any = None, *, error: BaseException | None = None
    ) -> None:
        """The held job ends with value, or with error: ``job_done``."""
        self._check_holds(job)
        self.held.remove(job)
        self.begun.discard(job)
        self._changed.set()
        self._callbacks().job_done(self, job, value, error)

    def items(self, job: Job[Any], items: list[Any]) -> None:
        """The held job's stream sends items: ``job_items``."""
        self._check_holds(job)
        self._callbacks().job_items(self, job, items)

    def report(self, job: Job[Any], obj: Any) -> None:
        """The held job calls ``corral.report(obj)``: ``job_report``."""
        self._check_holds(job)
        self._callbacks().job_report(self, job, obj)

    def die(
        self,
        error: corral.CorralError | None = None,
        *,
        unstarted: list[Job[Any]] | None = None,
        started: list[Job[Any]] | None = None,
    ) -> None:
        """The worker dies: ``worker_lost`` with every job it held. By default the
        acknowledged ones are started and the rest unstarted, each in the order sent; a
        test may say otherwise (a job delivered but not acknowledged that may have begun)
        as long as the two lists together are exactly what it held."""
        if not self.alive:
            raise AssertionError(f"script error: {self.name} is {self.state.value}")
        if unstarted is None and started is None:
            started = [job for job in self.held if job in self.begun]
            unstarted = [job for job in self.held if job not in self.begun]
        elif unstarted is None or started is None:
            raise AssertionError("script error: name both unstarted and started, or neither")
        if sorted(j.id for j in [*unstarted, *started]) != sorted(j.id for j in self.held):
            raise AssertionError(f"script error: {self.name} holds {self.held}")
        if error is None:
            error = corral.WorkerLostError(self.name, None, 9, "the script killed it")
        self.held.clear()
        self.begun.clear()
        self._end()
        self._callbacks().worker_lost(self, error, unstarted, started)

    async def until_received(self, n: int) -> list[Job[Any]]:
        """Wait (bounded) until it has been sent n jobs in all; the first n."""
        async with asyncio.timeout(BOUND):
            while len(self.received) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.received[:n]

    async def until_gone(self) -> None:
        """Wait (bounded) until it has stopped or died."""
        async with asyncio.timeout(BOUND):
            await self._gone.wait()

    # -- helpers ---------------------------------------------------------------------------

    def _callbacks(self) -> WorkerHost:
        assert self._host is not None, f"script error: {self.name} was never started"
        return self._host

    def _check_holds(self, job: Job[Any]) -> None:
        if job not in self.held:
            raise AssertionError(f"script error: {self.name} does not hold {job!r}")

    def _end(self) -> None:
        self.state = WorkerState.DEAD
        self._changed.set()
        self._gone.set()
