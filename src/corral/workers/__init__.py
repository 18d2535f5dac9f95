"""Worker kinds behind one small contract (see ``corral.workers._base``)."""

from __future__ import annotations

from ._base import Worker as Worker
from ._base import WorkerHost as WorkerHost
from ._dask import DaskWorker as DaskWorker
from ._local import LocalWorker as LocalWorker
from ._process import ProcessWorker as ProcessWorker
from ._thread import ThreadWorker as ThreadWorker

__all__ = ["DaskWorker", "LocalWorker", "ProcessWorker", "ThreadWorker", "Worker", "WorkerHost"]

for _name in __all__:
    globals()[_name].__module__ = "corral.workers"
del _name
