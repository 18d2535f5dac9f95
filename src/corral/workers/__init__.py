"""Worker kinds behind one small contract (see ``corral.workers._base``).

``ProcessWorker`` loads with the package, since every pool of processes uses it; the other
kinds load at their first use (``__getattr__``, PEP 562): a program of process pools never
pays for the thread, loop and Dask workers.
"""

from __future__ import annotations

import typing

from .._lazy import LazyNames as _LazyNames
from ._base import Worker as Worker
from ._base import WorkerHost as WorkerHost
from ._process import ProcessWorker as ProcessWorker

if typing.TYPE_CHECKING:  # loaded at first use: see _LAZY
    from ._dask import DaskWorker as DaskWorker
    from ._local import LocalWorker as LocalWorker
    from ._thread import ThreadWorker as ThreadWorker

__all__ = ["DaskWorker", "LocalWorker", "ProcessWorker", "ThreadWorker", "Worker", "WorkerHost"]

# The public names loaded at first use, and their modules.
_LAZY = {
    "DaskWorker": "corral.workers._dask",
    "LocalWorker": "corral.workers._local",
    "ThreadWorker": "corral.workers._thread",
}


_names = _LazyNames(globals(), _LAZY)


def __dir__() -> list[str]:
    """Every name here, those not loaded yet included."""
    return _names.dir()


if not typing.TYPE_CHECKING:  # a type checker reads the imports above, and flags a typo
    __getattr__ = _names.load  # PEP 562: called for a name not (yet) bound here

_names.publish_loaded()
