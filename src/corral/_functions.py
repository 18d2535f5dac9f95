"""How a called function reaches a worker: by its name, or as a definition. No I/O here.

A function the worker can import travels as its pickled name, pickled once per parent and
resolved once per worker. That holds for a script's own functions too: every start method
gives the worker the script as its ``__main__`` (fork inherits it; spawn and forkserver run
the script again as ``__mp_main__``, its main block skipped), so the worker runs its own
copy, as multiprocessing does, and identity holds: an instance of the script's class is an
instance of the worker's class, and multiprocessing in a task can pickle the script's
functions by name. ``main_reference_ok`` decides which ``__main__`` names are safe.

Any other function (a lambda, a closure, one defined in the main block, any function of a
``__main__`` with no file: ``python -c``, a REPL, a notebook) travels by value (cloudpickle),
as a *definition*: pickled once, numbered, sent to each worker once, before the first call
that needs it, and kept there; the calls carry only its number. A definition is reused only
while everything it copied is the very same object and immutable (``_captured``), so a
worker never runs a stale copy: rebind a global the function reads and the next call is a
new definition. The parent bounds what each worker holds (``HELD_MAX``, least recently used
first out) and tells the worker what to forget, so both tables stay in step.
"""

from __future__ import annotations

import ast
import functools
import io
import itertools
import operator
import os
import pickle
import sys
import types
import weakref
from collections import OrderedDict
from typing import Any, NamedTuple

# Plain functions and builtins whose pickle is their name are pickled once and kept by
# function: most programs call a handful of functions millions of times. Bounded: a
# program that makes functions without end only empties it now and then. Workers keep what
# they resolved the same way.
REFERENCES_MAX = 256
# Definitions kept by the parent (each holds its pickle) and by each worker (each holds a
# live function): enough for every function a program calls in a loop, few enough that a
# program making functions without end costs little memory.
DEFINITIONS_MAX = 256
HELD_MAX = 64
# A function that copies more than this many bytes of strings and bytes is pickled with
# each call instead: kept, hundreds of them (closures made per call over big data) would
# hold that data in the parent and in every worker long after the calls.
DEFINITION_BYTES_MAX = 64 * 1024

_PLAIN_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType)
_MISSING = object()  # a global a function reads that does not exist (yet)


# -- names the worker's __main__ is sure to have ------------------------------------------


def main_reference_ok(obj: Any) -> bool:
    """Whether obj, a function or class claiming ``__main__``, is what every worker's
    ``__main__`` holds under its name, so that it may travel by name.

    It must be bound, now, under its qualified name; its top-level name must be bound only
    by statements that run when the script is imported (never in a block under
    ``if __name__ ...``, nor through ``global`` in a function: spawn and forkserver skip
    those, and fork copies whatever they had bound when the worker started); and a
    function's code must come from the script's file (not ``exec``), and neither it nor
    a function or class of the script it uses may read a global the main block binds
    (spawned workers never bind it: by value it travels as the parent has it). A
    redefinition in the main block therefore travels by value and runs as redefined. A
    package's
    ``__main__`` (``python -m pkg``, a zipapp) is never run again in a spawned worker
    (multiprocessing skips it), so nothing of it goes by name.
    """
    main = sys.modules.get("__main__")
    qualname = getattr(obj, "__qualname__", None)
    if main is None or not isinstance(qualname, str) or "<" in qualname:
        return False
    spec = getattr(getattr(main, "__spec__", None), "name", None)
    if isinstance(spec, str) and spec.rpartition(".")[2] == "__main__":
        return False
    if _resolve(main, qualname) is not obj:
        return False
    path = getattr(main, "__file__", None)
    if not isinstance(path, str):
        return False
    stable, main_only = _script_names(path)
    if qualname.partition(".")[0] not in stable:
        return False
    code = getattr(obj, "__code__", None)
    if code is None:
        return True
    return _same_file(code.co_filename, path) and not _reads(obj, main_only, set())


def _reads(fn: Any, names: frozenset[str], seen: set[int]) -> bool:
    """Whether fn, or a function or class of its module that it uses, reads one of names."""
    if id(fn) in seen:
        return False
    seen.add(id(fn))
    module = fn.__globals__
    for name in _global_names(fn.__code__):
        if name in names:
            return True
        value = module.get(name)
        used = list(vars(value).values()) if isinstance(value, type) else [value]
        for member in used:
            part = getattr(member, "__func__", member)  # staticmethod, classmethod
            if (
                type(part) is types.FunctionType
                and part.__globals__ is module
                and _reads(part, names, seen)
            ):
                return True
    return False


def _resolve(module: types.ModuleType | None, qualname: str) -> Any:
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part, _MISSING)
    return target


def _same_file(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


# A main file's names: those bound at import time only, and those its main block binds.
_scripts: dict[str, tuple[frozenset[str], frozenset[str]]] = {}


def _script_names(path: str) -> tuple[frozenset[str], frozenset[str]]:
    """The names the script at path binds at import time and nowhere else, and those
    bound under a test of ``__name__`` (or deleted): read once."""
    names = _scripts.get(path)
    if names is None:
        try:
            with open(path, "rb") as file:
                tree = ast.parse(file.read(), path)
        except (OSError, SyntaxError, ValueError):
            tree = ast.Module(body=[], type_ignores=[])  # no source: nothing is stable
        names = _scripts[path] = _stable_names(tree)
    return names


def _stable_names(tree: ast.Module) -> tuple[frozenset[str], frozenset[str]]:
    """Names bound by statements run at import (compound ones included, function and
    class bodies not), less those bound under a test of ``__name__``, deleted, or declared
    ``global`` anywhere: each of those may differ between the parent and a worker. And
    the names bound under a test of ``__name__`` or deleted: the parent's alone."""
    bound: set[str] = set()
    unstable: set[str] = set()

    def visit(statements: list[ast.stmt], target: set[str]) -> None:
        for stmt in statements:
            if isinstance(stmt, ast.If) and _tests_name(stmt.test):
                visit(stmt.body, unstable)  # the main block: not run by spawned workers
                visit(stmt.orelse, unstable)
            elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                target.add(stmt.name)
            elif isinstance(stmt, ast.Import | ast.ImportFrom):
                target.update((a.asname or a.name).partition(".")[0] for a in stmt.names)
            else:
                for node in ast.iter_child_nodes(stmt):
                    if isinstance(node, ast.stmt):
                        continue  # visited below, as a block
                    for sub in ast.walk(node):
                        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store | ast.Del):
                            target.add(sub.id)
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    block = getattr(stmt, field, None)
                    if isinstance(block, list):
                        visit([s for s in block if isinstance(s, ast.stmt)], target)
                        for part in block:
                            if isinstance(part, ast.ExceptHandler | ast.match_case):
                                visit(part.body, target)
                if isinstance(stmt, ast.Delete):
                    unstable.update(n.id for n in stmt.targets if isinstance(n, ast.Name))

    visit(tree.body, bound)
    main_only = frozenset(unstable)
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):  # rebound whenever that function runs
            unstable.update(node.names)
    return frozenset(bound - unstable), main_only


def _tests_name(test: ast.expr) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "__name__" for n in ast.walk(test))


# -- by name ------------------------------------------------------------------------------

_references: dict[Any, tuple[Any, bytes, bool]] = {}  # fn -> (its code, its pickle, of main)


def reference(fn: Any) -> bytes | None:
    """fn pickled by name, when a worker can import it by that name; else None.

    Kept per function along with its code, so a function given new code is looked at
    again; a ``__main__`` function is checked to be still bound under its name.
    """
    entry = _references.get(fn)
    if entry is not None:
        code, pickled, main = entry
        if getattr(fn, "__code__", None) is code and (
            not main or _resolve(sys.modules.get("__main__"), fn.__qualname__) is fn
        ):
            return pickled
        _references.pop(fn, None)  # stale; pop: another thread's loop may pop it too
    if type(fn) not in _PLAIN_FUNCTIONS or not _module_level(fn):
        return None
    main = getattr(fn, "__module__", None) == "__main__"
    if main and not main_reference_ok(fn):
        return None
    try:
        pickled = pickle.dumps(fn, 5)
    except Exception:
        return None
    if len(_references) >= REFERENCES_MAX:
        _references.clear()
    _references[fn] = (getattr(fn, "__code__", None), pickled, main)
    return pickled


def _module_level(fn: Any) -> bool:
    owner = getattr(fn, "__self__", None)  # builtins: their module, or the object bound
    return owner is None or isinstance(owner, types.ModuleType)


def by_value(obj: Any, buffer_callback: Any = None) -> bytes:
    """obj pickled with cloudpickle (protocol 5), except that what a worker's ``__main__``
    holds goes by name (``main_pickler``)."""
    file = io.BytesIO()
    main_pickler()(file, 5, buffer_callback=buffer_callback).dump(obj)
    return file.getvalue()


@functools.cache
def main_pickler() -> type[Any]:
    """The pickler of ``by_value``, made at its first use: cloudpickle is the fallback for
    what pickle refuses, and a program (or worker) that never needs it does not import it
    (milliseconds on every worker's start)."""
    import cloudpickle  # noqa: PLC0415

    class MainPickler(cloudpickle.Pickler):  # type: ignore[misc]  # untyped
        """cloudpickle copies every ``__main__`` function and class; a copy is not the
        worker's own, so ``isinstance`` fails against it and multiprocessing refuses to
        pickle it: here those the worker can import go by name."""

        def reducer_override(self, obj: Any) -> Any:
            if (
                (type(obj) is types.FunctionType or isinstance(obj, type))
                and getattr(obj, "__module__", None) == "__main__"
                and main_reference_ok(obj)
            ):
                return NotImplemented  # pickle's own: by name
            return super().reducer_override(obj)

    return MainPickler


# -- by definition ------------------------------------------------------------------------


class Definition(NamedTuple):
    """A function pickled by value once, under a number no other definition has."""

    token: int
    data: bytes


_tokens = itertools.count(1)
_definitions: dict[types.FunctionType, tuple[list[Any], Definition]] = {}


def definition(fn: Any) -> Definition | None:
    """fn as a definition, or None when it must be pickled with each call: it is no plain
    function, or it copies something that may change in place (a list, a dict, an
    instance) or much data (``DEFINITION_BYTES_MAX``). Raises what pickling raised."""
    if type(fn) is not types.FunctionType:
        return None
    captured = _captured(fn, set())
    if captured is None or sum(map(_size, captured)) > DEFINITION_BYTES_MAX:
        return None
    entry = _definitions.get(fn)
    if entry is not None and _same(entry[0], captured):
        return entry[1]
    made = Definition(next(_tokens), by_value(fn))
    if len(_definitions) >= DEFINITIONS_MAX:
        _definitions.clear()
    # The captured objects are held, so no id among them is reused while this is kept.
    _definitions[fn] = (captured, made)
    return made


def _size(obj: Any) -> int:
    return len(obj) if type(obj) in _SIZED else 0


_SIZED = frozenset({str, bytes})


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


_ATOMS = frozenset(
    {int, float, complex, str, bytes, bool, type(None), type(...), type(NotImplemented)}
)


def _captured(fn: types.FunctionType, seen: set[int]) -> list[Any] | None:
    """Every object a by-value pickle of fn copies, or None if one may change in place.

    Two calls that find the same objects here would pickle the same function, so the
    first pickle may serve both. Objects that go by name (modules, importable functions
    and classes) count as themselves: the worker has its own.
    """
    if id(fn) in seen:
        return []  # recursion: counted once
    seen.add(id(fn))
    if fn.__dict__:
        return None  # attributes may be mutated
    found: list[Any] = [fn, fn.__code__, fn.__defaults__]
    values: list[Any] = list(fn.__defaults__ or ())
    for key, value in (fn.__kwdefaults__ or {}).items():
        found.append(key)
        values.append(value)
    for cell in fn.__closure__ or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:
            return None  # empty cell: filled later
    names = fn.__globals__
    values.extend(names.get(name, _MISSING) for name in _global_names(fn.__code__))
    for value in values:
        part = _frozen(value, seen)
        if part is None:
            return None
        found.extend(part)
    return found


def _frozen(value: Any, seen: set[int]) -> list[Any] | None:
    kind = type(value)
    if kind in _ATOMS or value is _MISSING or kind is types.ModuleType:
        return [value]
    if kind is tuple or kind is frozenset:
        found: list[Any] = [value]
        for item in value:
            part = _frozen(item, seen)
            if part is None:
                return None
            found.extend(part)
        return found
    if kind in _PLAIN_FUNCTIONS or isinstance(value, type):
        if _by_name(value):
            return [value]
        if kind is types.FunctionType:
            return _captured(value, seen)
    return None


def _by_name(obj: Any) -> bool:
    """Whether cloudpickle sends obj, a function or class, by its name."""
    module = getattr(obj, "__module__", None)
    if module == "__main__":
        return main_reference_ok(obj)
    qualname = getattr(obj, "__qualname__", "<")
    imported = sys.modules.get(module) if isinstance(module, str) else None
    return imported is not None and "<" not in qualname and _resolve(imported, qualname) is obj


_names: dict[types.CodeType, tuple[str, ...]] = {}


def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """The names code (and the code nested in it) may read as globals."""
    names = _names.get(code)
    if names is None:
        found = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                found.update(_global_names(const))
        if len(_names) >= DEFINITIONS_MAX:
            _names.clear()
        names = _names[code] = tuple(sorted(found))
    return names


# -- what each worker holds -----------------------------------------------------------------

_held: weakref.WeakKeyDictionary[Any, OrderedDict[int, None]] = weakref.WeakKeyDictionary()


def hold(receiver: Any, token: int) -> tuple[bool, int]:
    """Record that receiver gets definition token with the frame now being made.

    Returns whether the definition must go with it, and a token receiver must forget
    first (0 for none), the least recently used, to stay within ``HELD_MAX``. receiver is
    any object that lives exactly as long as the worker's channel (its shared region).
    """
    held = _held.get(receiver)
    if held is None:
        held = _held[receiver] = OrderedDict()
    if token in held:
        held.move_to_end(token)
        return False, 0
    forget = held.popitem(last=False)[0] if len(held) >= HELD_MAX else 0
    held[token] = None
    return True, forget


class Functions:
    """A worker's functions: those it resolved by name, and the definitions it was sent."""

    def __init__(self) -> None:
        self._named: dict[bytes, Any] = {}
        self._defined: dict[int, Any] = {}  # token -> its pickle, until first used

    def define(self, token: int, body: bytes | bytearray | memoryview) -> None:
        """A definition arrived; an empty one says forget token. It is unpickled when a
        call first needs it, as part of unpickling that call, so a definition that kills
        the worker as it unpickles counts as that call's arguments doing so."""
        if len(body):
            self._defined[token] = bytes(body)
        else:
            self._defined.pop(token, None)

    def load(self, sent: Any) -> Any:
        """The function a call names: itself, its pickled name, or ``(token,)``."""
        kind = type(sent)
        if kind is bytes:
            fn = self._named.get(sent)
            if fn is None:
                if len(self._named) >= REFERENCES_MAX:
                    self._named.clear()
                fn = self._named[sent] = pickle.loads(sent)
            return fn
        if kind is tuple:
            (token,) = sent
            fn = self._defined.get(token)
            if fn is None:
                raise LookupError(f"definition {token} never reached this worker")
            if type(fn) is bytes:
                fn = self._defined[token] = pickle.loads(fn)
            return fn
        return sent

    def __len__(self) -> int:
        return len(self._named) + len(self._defined)
