"""corral's modules are layers: their imports never go round in a circle, and no module
takes another module's private names.

The source is read with ``ast``, not imported, so every import counts: at module level,
under ``if TYPE_CHECKING:``, inside a function. A circle that only the type checker follows
is still a circle for a reader: neither module can be understood, tested or moved without
the other. Edges are the modules an import names (``from .workers import DaskWorker`` is an
edge to ``corral.workers``, ``from .. import _child`` one to ``corral._child``); importing a
submodule also runs its package's ``__init__``, an edge left out here, since every module
would otherwise lead back to ``corral/__init__.py`` and through it to everything.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import corral

SOURCE = Path(corral.__file__).parent


class Use(NamedTuple):
    """One name a module takes from another corral module."""

    importer: str
    owner: str  # the module the name belongs to
    name: str | None  # None: the module itself
    line: int


def modules(root: Path = SOURCE) -> dict[str, Path]:
    """Every module of the package at root, by dotted name (a package by its own)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None for anything but names and attributes."""
    names: list[str] = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    names.append(node.id)
    return names[::-1]


def uses(name: str, source: str, known: set[str], *, is_package: bool) -> Iterator[Use]:
    """What module name (its source given) takes from the modules in known: each module it
    imports, and each name it imports from one or reads as ``module.name``."""
    package = name if is_package else name.rpartition(".")[0]  # what "." means in it
    bound: dict[str, str] = {}  # local name -> the module it is bound to
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield Use(name, alias.name, None, node.lineno)
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        top = alias.name.partition(".")[0]
                        bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                owner = f"{base}.{node.module}" if node.module else base
            else:
                owner = node.module or ""
            for alias in node.names:
                submodule = f"{owner}.{alias.name}"
                if submodule in known:
                    yield Use(name, submodule, None, node.lineno)
                    bound[alias.asname or alias.name] = submodule
                elif owner in known:
                    yield Use(name, owner, alias.name, node.lineno)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        dotted = _dotted(node)
        if dotted is None or dotted[0] not in bound:
            continue
        owner = bound[dotted[0]]
        rest = dotted[1:]
        while rest and f"{owner}.{rest[0]}" in known:  # corral._wire.loads: _wire's loads
            owner = f"{owner}.{rest.pop(0)}"
        if len(rest) == 1:  # only the outermost attribute of a chain: each is seen once
            yield Use(name, owner, rest[0], node.lineno)


def all_uses(root: Path = SOURCE) -> list[Use]:
    """Every use of one corral module by another, in the package at root."""
    found = modules(root)
    result = []
    for name, path in found.items():
        read = uses(name, path.read_text(), set(found), is_package=path.name == "__init__.py")
        result.extend(use for use in read if use.owner != name)
    return result


def graph(root: Path = SOURCE) -> dict[str, set[str]]:
    """Each module of the package at root and the corral modules it imports."""
    edges: dict[str, set[str]] = {name: set() for name in modules(root)}
    for use in all_uses(root):
        edges[use.importer].add(use.owner)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One shortest circle through each group of modules that import each other (a
    strongly connected component), as [a, b, ..., a]; [] when the graph has none."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the graph is a few dozen modules
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or node in edges.get(node, ()):
                groups.append(group)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(_shortest_circle(edges, group) for group in groups)


def _shortest_circle(edges: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest path from the group's first module back to itself, within the group."""
    start = min(group)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for target in sorted(edges[node] & group):
            if target == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if target not in came_from:
                came_from[target] = node
                queue.append(target)
    raise AssertionError(f"no circle in {group}")  # pragma: no cover: a group has one


def private_reaches(root: Path = SOURCE) -> set[tuple[str, str, str]]:
    """(importer, owner, name) for each private name a module takes from another."""
    return {
        (use.importer, use.owner, use.name)
        for use in all_uses(root)
        if use.name is not None and use.name.startswith("_") and not use.name.startswith("__")
    }


def _circles(circles: list[list[str]]) -> str:
    return "; ".join(" -> ".join(circle) for circle in circles)


def test_no_import_circle() -> None:
    """No corral module imports, however indirectly, one that imports it back, counting
    imports under ``TYPE_CHECKING`` and inside functions."""
    found = cycles(graph())
    assert not found, f"import circles: {_circles(found)}"


def test_no_module_takes_another_modules_private_names() -> None:
    """No module takes a private name of another, by ``from .x import _name`` or as
    ``x._name``."""
    new = sorted(private_reaches())
    assert not new, f"private names taken from another module: {new}"


def test_the_reading_counts_every_kind_of_import(tmp_path: Path) -> None:
    """The checks above can fail: imports under ``TYPE_CHECKING``, inside a function and
    relative ones from a subpackage are edges, a circle among them is found and named,
    and a private name, imported or read through the module, is a reach."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
    )
    (package / "b.py").write_text("def f():\n    from .sub import c\n    return c._hidden\n")
    (package / "sub" / "c.py").write_text("from .. import a\nfrom ..b import _private\n")
    (package / "d.py").write_text("import pkg.sub.c as c\nfrom pkg import a\n")
    assert graph(package) == {
        "pkg": set(),
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.d": {"pkg.a", "pkg.sub.c"},
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg.a", "pkg.b"},
    }
    assert cycles(graph(package)) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert private_reaches(package) == {
        ("pkg.b", "pkg.sub.c", "_hidden"),
        ("pkg.sub.c", "pkg.b", "_private"),
    }
