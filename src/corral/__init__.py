"""corral: an asyncio-native process pool and task queue.

Workers are processes whose pipes the event loop drives: no helper threads, no polling. A
worker that crashes costs one job at most and is replaced; a job is never lost or silently
run twice.

    async with corral.Pool() as pool:
        y = await pool.run(f, x)
        ys = await pool.map(f, xs)

Importing corral loads only what a worker process needs too (the errors, ``report``); the
rest loads at its first use (``corral.Pool`` loads the pool), through ``__getattr__``. Every
worker process imports this package, and so does the forkserver before it forks the first
worker: each module the pool's side loaded here would delay the first answer twice.
"""

from __future__ import annotations

import typing

from ._errors import CorralError as CorralError
from ._errors import PoolClosedError as PoolClosedError
from ._errors import RemoteTraceback as RemoteTraceback
from ._errors import SerializationError as SerializationError
from ._errors import SoftTimeLimitExceeded as SoftTimeLimitExceeded
from ._errors import TimeLimitExceeded as TimeLimitExceeded
from ._errors import WorkerLostError as WorkerLostError
from ._errors import WorkerStartupError as WorkerStartupError
from ._lazy import LazyNames as _LazyNames
from ._report import report as report

if typing.TYPE_CHECKING:  # loaded at first use: see _LAZY
    from . import executor as executor
    from . import workers as workers
    from ._job import Job as Job
    from ._job import JobState as JobState
    from ._pool import Pool as Pool
    from ._stats import QueueStats as QueueStats
    from ._stream import StreamIterator as StreamIterator
    from ._taskqueue import TaskQueue as TaskQueue
    from ._tracker import Tracker as Tracker
    from .executor import Executor as Executor

__version__ = "0.1.0"  # the one place it is written; pyproject.toml reads it from here

__all__ = [
    "CorralError",
    "Executor",
    "Job",
    "JobState",
    "Pool",
    "PoolClosedError",
    "QueueStats",
    "RemoteTraceback",
    "SerializationError",
    "SoftTimeLimitExceeded",
    "StreamIterator",
    "TaskQueue",
    "TimeLimitExceeded",
    "Tracker",
    "WorkerLostError",
    "WorkerStartupError",
    "report",
]

# The public names loaded at first use, and their modules.
_LAZY = {
    "Executor": "corral.executor",
    "Job": "corral._job",
    "JobState": "corral._job",
    "Pool": "corral._pool",
    "QueueStats": "corral._stats",
    "StreamIterator": "corral._stream",
    "TaskQueue": "corral._taskqueue",
    "Tracker": "corral._tracker",
}

# The public submodules that ``import corral`` alone made reachable before it loaded lazily.
_SUBMODULES = ("executor", "workers")


_names = _LazyNames(globals(), _LAZY, _SUBMODULES)


def __dir__() -> list[str]:
    """Every name here, those not loaded yet included."""
    return _names.dir()


if not typing.TYPE_CHECKING:  # a type checker reads the imports above, and flags a typo
    __getattr__ = _names.load  # PEP 562: called for a name not (yet) bound here

_names.publish_loaded()
