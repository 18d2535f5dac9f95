"""Worker kinds behind one small contract (see ``corral.workers._base``).

``ProcessWorker`` loads with the package, since every pool of processes uses it; the other
kinds load at their first use (``__getattr__``, PEP 562): a program of process pools never
pays for the thread, loop and Dask workers.
"""

from __future__ import annotations

import importlib
import sys
import typing

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


def _publish(name: str, obj: type) -> None:
    """Bind obj here as name, answering to ``corral.workers`` rather than its private
    module."""
    obj.__module__ = "corral.workers"
    globals()[name] = obj


def _load(name: str) -> type:
    """Load a worker kind at its first use, and publish with it every other one whose
    module is loaded by now."""
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'corral.workers' has no attribute {name!r}")
    cls: type = getattr(importlib.import_module(where), name)
    _publish(name, cls)
    for other, home in _LAZY.items():
        module = sys.modules.get(home)  # None, or perhaps still being imported by a thread
        if other not in globals() and hasattr(module, other):
            _publish(other, getattr(module, other))
    return cls


def __dir__() -> list[str]:
    """Every name here, those not loaded yet included."""
    return sorted({*globals(), *__all__})


if not typing.TYPE_CHECKING:  # a type checker reads the imports above, and flags a typo
    __getattr__ = _load  # PEP 562: called for a name not (yet) bound here


for _name in __all__:
    if _name in globals():
        _publish(_name, globals()[_name])
del _name
