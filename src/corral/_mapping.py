"""Many calls of one function: ``map`` cuts its input into chunks, one job each, so the
per-job cost (a pickle, a frame, a round trip) is shared by many small calls."""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._job import Job
    from ._taskqueue import TaskQueue

# map() cuts its input into about this many chunks per worker: enough for the workers to
# balance uneven chunks, few enough that per-job overhead vanishes for tiny calls.
CHUNKS_PER_WORKER = 4


def call_each(fn: Callable[[Any], Any], items: Iterable[Any]) -> Any:
    """Run fn on each item of a chunk, in a worker of any kind. For a coroutine function
    it returns one coroutine awaiting them in turn, which the worker runs as it runs any
    coroutine (in the loop, on the thread's loop, or on the child's)."""
    results = [fn(item) for item in items]
    if results and inspect.iscoroutine(results[0]):
        return _await_each(results)
    return results


async def _await_each(coroutines: list[Coroutine[Any, Any, Any]]) -> list[Any]:
    return [await c for c in coroutines]


def check_chunksize(chunksize: object) -> None:
    if chunksize is not None and (
        not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1
    ):
        raise ValueError(f"chunksize must be a positive int or None, not {chunksize!r}")


def auto_chunksize(n: int, workers: int) -> int:
    """Chunk size for n calls over workers: about ``CHUNKS_PER_WORKER`` chunks each."""
    return max(1, math.ceil(n / (max(1, workers) * CHUNKS_PER_WORKER)))


async def map_list(
    queue: TaskQueue,
    fn: Callable[[Any], Any],
    iterable: Iterable[Any],
    *,
    chunksize: int | None,
    options: dict[str, Any],
    progress: bool | str,
) -> list[Any]:
    """``TaskQueue.map``."""
    check_chunksize(chunksize)
    items = list(iterable)
    if not items:
        return []
    size = chunksize or auto_chunksize(len(items), queue._worker_count())
    return await map_jobs(queue.submit, fn, items, size, options)


def imap_items(
    queue: TaskQueue,
    fn: Callable[[Any], Any],
    iterable: Iterable[Any] | AsyncIterable[Any],
    *,
    ordered: bool,
    chunksize: int | None,
    options: dict[str, Any],
    progress: bool | str,
) -> AsyncIterator[Any]:
    """``TaskQueue.imap``."""
    raise NotImplementedError("imap: being written")


async def map_jobs(
    submit: Callable[..., Job[Any]],
    fn: Callable[[Any], Any],
    items: list[Any],
    size: int,
    options: dict[str, Any],
) -> list[Any]:
    """Submit fn over items in chunks of size and gather the values in input order; the
    first exception cancels the rest of the map and is raised."""
    jobs: list[Job[Any]]
    if size == 1:
        jobs = [submit(fn, x, **options) for x in items]
    else:
        jobs = [
            submit(call_each, fn, items[i : i + size], **options)
            for i in range(0, len(items), size)
        ]
    try:
        parts = await asyncio.gather(*(job.future for job in jobs))
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    if size == 1:
        return parts
    return [value for part in parts for value in part]
