"""Large arguments and results cross the pipes whole, out of band, in both directions."""

from __future__ import annotations

import asyncio

import pytest

import corral
from tests import tasks

MiB = 1 << 20


@pytest.mark.timeout(60)
async def test_large_bytes_argument_and_result() -> None:
    """64 MiB of bytes goes to a worker and comes back intact, as bytes, next to small calls
    (frame boundaries survive writes that span many pipe-fulls)."""
    data = bytes(range(256)) * (64 * MiB // 256)
    async with corral.Pool(2) as pool:
        small = pool.submit(tasks.add, 1, 2)
        assert await pool.run(tasks.checksum, data) == tasks.checksum(data)
        result = await pool.run(tasks.make_bytes, 64 * MiB)
        assert type(result) is bytes
        assert result == tasks.make_bytes(64 * MiB)
        assert await small == 3


@pytest.mark.timeout(60)
async def test_bytearray_round_trip_under_prefetch() -> None:
    """bytearrays of several sizes around the out-of-band threshold survive, in order,
    when several calls share a worker's pipe (prefetch)."""
    sizes = [0, 1, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 3 * MiB]
    async with corral.Pool(1, strategy="prefetch", prefetch=4) as pool:
        jobs = [pool.submit(tasks.make_bytearray, n) for n in sizes]
        results = [await job for job in jobs]
    assert [len(r) for r in results] == sizes
    assert all(type(r) is bytearray and r == bytearray(b"\xa5" * len(r)) for r in results)


@pytest.mark.timeout(60)
async def test_large_payloads_in_a_row_share_or_fall_back() -> None:
    """Several large arguments in flight to one worker at once (prefetch) all arrive
    intact: the first goes through the shared region, and those sent before the worker
    took it out fall back to the pipe rather than overwrite it."""
    payloads = [bytes([i]) * (3 * MiB + i) for i in range(5)]
    async with corral.Pool(1, strategy="prefetch", prefetch=5) as pool:
        jobs = [pool.submit(tasks.checksum, p) for p in payloads]
        results = [await job for job in jobs]
        echoed = await asyncio.gather(*(pool.run(tasks.identity, p) for p in payloads))
    assert results == [tasks.checksum(p) for p in payloads]
    assert echoed == payloads
