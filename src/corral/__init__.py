"""corral: an asyncio-native process pool and task queue.

Workers are processes whose pipes the event loop drives: no helper threads, no polling. A
worker that crashes costs one job at most and is replaced; a job is never lost or silently
run twice.

    async with corral.Pool() as pool:
        y = await pool.run(f, x)
        ys = await pool.map(f, xs)
"""

from __future__ import annotations

from ._errors import CorralError as CorralError
from ._errors import PoolClosedError as PoolClosedError
from ._errors import RemoteTraceback as RemoteTraceback
from ._errors import SerializationError as SerializationError
from ._errors import SoftTimeLimitExceeded as SoftTimeLimitExceeded
from ._errors import TimeLimitExceeded as TimeLimitExceeded
from ._errors import WorkerLostError as WorkerLostError
from ._errors import WorkerStartupError as WorkerStartupError
from ._job import Job as Job
from ._job import JobState as JobState
from ._pool import Pool as Pool
from ._report import report as report
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

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("corral."):
        _obj.__module__ = "corral"
del _name, _obj
