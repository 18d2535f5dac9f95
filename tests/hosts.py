"""A host for driving one worker directly in tests: it records every callback a worker
makes, in order, and checks each comes from the event loop's thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import corral
from corral import Job, JobState
from corral._job import move, new_job
from corral._stream import ItemStream
from corral.workers._base import Worker

BOUND = 10.0  # seconds any one wait may take


class Host:
    """Records what a worker reports, in order; each job's outcome and the loss are
    futures. Notes any callback made outside the loop's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()  # the loop's
        self.events: list[tuple[str, int]] = []
        self.outcomes: dict[int, asyncio.Future[tuple[Any, BaseException | None]]] = {}
        self.states_at_start: dict[int, JobState] = {}
        self.run_times: dict[int, float | None] = {}
        self.items: dict[int, list[Any]] = {}  # what each stream sent, in order
        self.reports: dict[int, list[Any]] = {}
        self.lost: asyncio.Future[tuple[corral.CorralError, list[Job[Any]], list[Job[Any]]]]
        self.lost = self.loop.create_future()
        self.wrong_thread = False
        self._ids = 0

    def job(
        self,
        fn: Callable[..., Any],
        *args: Any,
        soft: float | None = None,
        window: int | None = None,
    ) -> Job[Any]:
        """A new job for fn(*args), owned by this host; with a window, a stream."""
        self._ids += 1
        job: Job[Any] = new_job(self, self._ids, fn, args, self.loop, soft_time_limit=soft)
        if window is not None:
            job.stream = ItemStream(window)
        self.outcomes[job.id] = self.loop.create_future()
        return job

    async def until_items(self, job: Job[Any], n: int) -> list[Any]:
        """Wait (bounded) until job's stream has sent at least n items; all it sent."""
        async with asyncio.timeout(BOUND):
            while len(self.items.get(job.id, ())) < n:
                await asyncio.sleep(0.001)
        assert not self.wrong_thread
        return self.items[job.id]

    async def outcome(self, job: Job[Any]) -> tuple[Any, BaseException | None]:
        """Wait (bounded) for job_done of job: (value, error)."""
        async with asyncio.timeout(BOUND):
            result = await self.outcomes[job.id]
        assert not self.wrong_thread
        return result

    async def loss(self) -> tuple[corral.CorralError, list[Job[Any]], list[Job[Any]]]:
        """Wait (bounded) for worker_lost: (error, unstarted, started)."""
        async with asyncio.timeout(BOUND):
            result = await asyncio.shield(self.lost)
        assert not self.wrong_thread
        return result

    def _check_thread(self) -> None:
        if threading.get_ident() != self.thread:
            self.wrong_thread = True

    # -- WorkerHost ----------------------------------------------------------------------

    def job_started(self, worker: Worker, job: Job[Any]) -> None:
        self._check_thread()
        self.events.append(("started", job.id))
        if job.state is JobState.SENT:  # as the queue does: the worker only reports it
            move(job, JobState.RUNNING)
        self.states_at_start[job.id] = job.state

    def job_done(
        self, worker: Worker, job: Job[Any], value: Any, error: BaseException | None
    ) -> None:
        self._check_thread()
        self.events.append(("done", job.id))
        self.run_times[job.id] = job.run_time
        worker.tasks_done += 1  # as the queue does: the worker only reports
        assert not self.outcomes[job.id].done(), f"job {job.id} reported twice"
        self.outcomes[job.id].set_result((value, error))

    def job_items(self, worker: Worker, job: Job[Any], items: list[Any]) -> None:
        self._check_thread()
        assert not self.outcomes[job.id].done(), f"items of job {job.id} after its end"
        self.events.append(("items", job.id))
        self.items.setdefault(job.id, []).extend(items)

    def job_report(self, worker: Worker, job: Job[Any], obj: Any) -> None:
        self._check_thread()
        assert not self.outcomes[job.id].done(), f"a report of job {job.id} after its end"
        self.events.append(("report", job.id))
        self.reports.setdefault(job.id, []).append(obj)

    def worker_lost(
        self,
        worker: Worker,
        error: corral.CorralError,
        unstarted: list[Job[Any]],
        started: list[Job[Any]],
    ) -> None:
        self._check_thread()
        self.events.append(("lost", 0))
        assert not self.lost.done(), "worker_lost reported twice"
        self.lost.set_result((error, unstarted, started))

    # -- JobOwner ------------------------------------------------------------------------

    def cancel_job(self, job: Job[Any]) -> None:
        pass


def send(worker: Worker, job: Job[Any]) -> Job[Any]:
    """Hand job to worker as a queue does (the job is SENT first: workers only report) and
    return it, so a test can write ``job = send(worker, ...)``."""
    if job.state is JobState.PENDING:  # a test may send one it marked cancelled
        move(job, JobState.SENT)
    worker.send(job)
    worker.tasks_sent += 1
    return job


W = TypeVar("W", bound=Worker)


async def started(worker: W, host: Host) -> W:
    """worker, started for host (within BOUND seconds)."""
    async with asyncio.timeout(BOUND):
        await worker.start(host)
    return worker
