"""``corral.report``: what a running task sends its caller arrives in order, before the
result, through ``job.reports()`` or a callback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import corral
from tests import tasks
from tests.waits import bounded


async def collect(job: corral.Job[Any]) -> list[Any]:
    return [obj async for obj in job.reports()]


async def check_reported_in_order(job: corral.Job[Any], n: int) -> None:
    """job (``report_each(n)``) reports its n steps in order, through ``job.reports()``
    and ``job.on_report``, all before its result."""
    order: list[str] = []
    settled = asyncio.Event()
    job.on_report(lambda obj: order.append(f"report {obj['step']}"))
    job.add_done_callback(lambda _: (order.append("result"), settled.set()))
    assert await bounded(collect(job)) == [{"step": i} for i in range(n)]
    assert await bounded(job) == "finished"
    # Done-callbacks run in a later turn of the loop; since Python 3.12 awaiting a finished
    # future (as wait_for does) returns before they have run.
    await bounded(settled.wait())
    assert order == [*(f"report {i}" for i in range(n)), "result"]


async def test_reports_arrive_in_order_and_before_the_result() -> None:
    async with corral.Pool(1) as pool:
        await check_reported_in_order(pool.submit(tasks.report_each, 500), 500)


async def test_reports_sent_before_reading_are_kept() -> None:
    async with corral.Pool(1) as pool:
        job = pool.submit(tasks.report_each, 3)
        assert await bounded(job) == "finished"
        assert await bounded(collect(job)) == [{"step": 0}, {"step": 1}, {"step": 2}]


async def test_a_job_without_reports_ends_its_reading_when_done() -> None:
    async with corral.Pool(1) as pool:
        job = pool.submit(tasks.add, 1, 2)
        assert await bounded(collect(job)) == []
        assert job.result() == 3


async def test_a_report_that_will_not_pickle_raises_in_the_task() -> None:
    async with corral.Pool(1) as pool:
        assert await bounded(pool.run(tasks.report_unpicklable)) == "SerializationError"


def test_report_outside_a_task_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="outside a task run by corral"):
        corral.report("x")
