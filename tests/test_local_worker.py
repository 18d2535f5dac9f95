"""What is ``LocalWorker``'s alone: jobs run in the event loop itself, so ``send`` can only
queue them and a plain callable cannot be interrupted. The contract it shares with every
worker kind (outcomes, order, cancellation, soft limits on coroutines, giving up on a task
that ignores cancellation, streams, reports, a ``TaskQueue``) is in
``test_worker_contract.py``."""

from __future__ import annotations

import asyncio
import threading
import time

from corral import JobState
from corral.workers._local import LocalWorker
from tests.hosts import Host, send, started


async def test_send_only_queues_and_calls_run_in_the_loops_thread() -> None:
    """send() never runs the job: when it returns nothing has run and the job is SENT; the
    jobs start on a later loop turn, in the loop's own thread."""
    host = Host()
    worker = await started(LocalWorker(), host)
    log: list[str] = []

    async def record(tag: str) -> str:
        log.append(tag)
        await asyncio.sleep(0)
        return tag

    try:
        jobs = [
            host.job(log.append, "plain"),
            host.job(record, "coroutine"),
            host.job(threading.get_ident),
        ]
        for job in jobs:
            send(worker, job)
            assert job.state is JobState.SENT
        assert not log
        assert await host.outcome(jobs[1]) == ("coroutine", None)
        assert log == ["plain", "coroutine"]
        assert await host.outcome(jobs[2]) == (host.thread, None)
    finally:
        await worker.stop()


async def test_soft_limit_is_not_enforced_on_a_plain_callable() -> None:
    """A plain callable cannot be interrupted in the loop: past its soft limit it runs to
    its end, and its value counts."""
    host = Host()
    worker = await started(LocalWorker(), host)
    try:
        plain = send(worker, host.job(time.sleep, 0.02, soft=0.001))
        assert await host.outcome(plain) == (None, None)
        assert worker.alive
    finally:
        await worker.stop()
