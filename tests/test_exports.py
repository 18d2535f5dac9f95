"""The public door: ``corral`` and ``corral.workers`` export exactly their public names, in a
sorted ``__all__``, each object answering to the public module rather than a private one."""

from __future__ import annotations

import importlib.metadata
import pickle
import types

import pytest

import corral
import corral.workers


def public_names(module: types.ModuleType) -> list[str]:
    """Names a user sees in module: not private, not a submodule, not a ``__future__``
    directive. Names loaded lazily (PEP 562) count as if loaded."""
    values = {name: getattr(module, name) for name in dir(module)}
    return sorted(
        name
        for name, value in values.items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and type(value).__module__ != "__future__"
    )


@pytest.mark.parametrize("module", [corral, corral.workers], ids=lambda m: m.__name__)
def test_all_is_sorted_and_unique(module: types.ModuleType) -> None:
    """``__all__`` is sorted and lists each name once."""
    assert module.__all__ == sorted(set(module.__all__))


@pytest.mark.parametrize("module", [corral, corral.workers], ids=lambda m: m.__name__)
def test_all_is_exactly_the_public_names(module: types.ModuleType) -> None:
    """Every public name in the namespace is in ``__all__`` and every name in ``__all__``
    exists: no helper leaks out of the door (such as ``importlib.metadata.version``)."""
    public = set(public_names(module))
    assert sorted(public - set(module.__all__)) == [], "public names missing from __all__"
    assert sorted(set(module.__all__) - public) == [], "names in __all__ that do not exist"


@pytest.mark.parametrize(
    ("module", "expected"),
    [(corral, "corral"), (corral.workers, "corral.workers")],
    ids=["corral", "corral.workers"],
)
def test_objects_answer_to_the_public_module(module: types.ModuleType, expected: str) -> None:
    """Each exported object's ``__module__`` is the public module, so tracebacks, reprs and
    pickles say ``corral.WorkerLostError``, never ``corral._errors.WorkerLostError``."""
    wrong = {
        name: getattr(module, name).__module__
        for name in module.__all__
        if getattr(module, name).__module__ != expected
    }
    assert wrong == {}


def test_star_import_gives_all() -> None:
    """``from corral import *`` binds exactly the names in ``__all__``."""
    namespace: dict[str, object] = {}
    exec("from corral import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == corral.__all__


def test_public_classes_pickle_by_public_name() -> None:
    """Classes and enum members pickle by reference through ``corral`` and come back as the
    very same objects."""
    for name in corral.__all__:
        obj = getattr(corral, name)
        if isinstance(obj, type):
            data = pickle.dumps(obj)
            assert b"corral._" not in data, name
            assert pickle.loads(data) is obj
    for state in corral.JobState:
        assert pickle.loads(pickle.dumps(state)) is state


def test_error_repr_names_the_public_class() -> None:
    """An error's class shows as ``corral.WorkerLostError`` in reprs and tracebacks."""
    assert repr(corral.WorkerLostError) == "<class 'corral.WorkerLostError'>"


def test_version_is_the_installed_distribution_version() -> None:
    """``corral.__version__`` is the installed package's version string."""
    assert corral.__version__ == importlib.metadata.version("corral")
