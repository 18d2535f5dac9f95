"""Public names loaded at their first use (PEP 562), for ``corral`` and ``corral.workers``.

``import corral`` loads its errors and ``report`` only, since every worker process imports
the package; a name such as ``Pool`` loads when the program first touches it. Each name
answers to its public module (``corral.Job``, never ``corral._job.Job``): in tracebacks,
reprs and pickles by name.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


class LazyNames:
    """The lazily loaded names of one public module, whose globals are namespace."""

    def __init__(
        self,
        namespace: dict[str, Any],
        lazy: dict[str, str],
        submodules: tuple[str, ...] = (),
    ) -> None:
        self.namespace = namespace
        self.public = str(namespace["__name__"])
        self.lazy = lazy  # name -> the module that defines it
        self.submodules = submodules  # reachable after a plain import, as before

    def publish(self, name: str, obj: object) -> None:
        """Bind obj in the public module as name, answering to that module."""
        if getattr(obj, "__module__", "").startswith("corral."):
            obj.__module__ = self.public
        self.namespace[name] = obj

    def publish_loaded(self) -> None:
        """Publish the public names the module has bound itself."""
        for name in self.namespace["__all__"]:
            if name in self.namespace:
                self.publish(name, self.namespace[name])

    def load(self, name: str) -> Any:
        """Load a public name at its first use, and publish with it every other one whose
        module is loaded by now, so an object the pool hands out (a ``Job``) answers to
        its public module as soon as the program has touched the pool."""
        if name in self.submodules:
            return importlib.import_module(f"{self.public}.{name}")
        where = self.lazy.get(name)
        if where is None:
            raise AttributeError(f"module {self.public!r} has no attribute {name!r}")
        obj = getattr(importlib.import_module(where), name)
        self.publish(name, obj)
        for other, home in self.lazy.items():
            module = sys.modules.get(home)  # None, or perhaps still being imported by a thread
            if other not in self.namespace and hasattr(module, other):
                self.publish(other, getattr(module, other))
        return obj

    def dir(self) -> list[str]:
        """Every name of the module, those not loaded yet included."""
        return sorted({*self.namespace, *self.namespace["__all__"]})
