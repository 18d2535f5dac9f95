"""A first end-to-end check that a pool runs calls in other processes."""

from __future__ import annotations

import os

import corral
from tests import tasks


async def test_run_in_another_process() -> None:
    """A call runs in a worker process, not in the test's own."""
    async with corral.Pool(2) as pool:
        assert await pool.run(tasks.add, 2, 3) == 5
        assert await pool.run(tasks.pid) != os.getpid()
