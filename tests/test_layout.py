"""The package's import structure: no loops, and the operator's side sees narrow views.

Read from the source (every `import`, at module level, in functions and under
TYPE_CHECKING alike), so an import hidden inside a function cannot break a loop unseen.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "wa_router"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path) -> Iterator[str]:
    """The wa_router modules `path` imports (a `from .x import y` of a submodule y counts
    as importing x.y)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("wa_router"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.startswith("wa_router"):
                target = node.module
            else:
                continue
            yield target
            for alias in node.names:
                yield f"{target}.{alias.name}"


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in imported(path) if m in files and m != name}
        for name, path in files.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_cycles_finds_loops(edges: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(edges) == expected


def test_the_router_has_no_import_loop() -> None:
    edges = graph()
    router = {
        m: {t for t in ts if not t.startswith("wa_router.sim")}
        for m, ts in edges.items()
        if not m.startswith("wa_router.sim")
    }
    # The imports were read (an empty graph has no loop either).
    assert "wa_router.app" in router["wa_router.server"]
    assert "wa_router.runtime" in router["wa_router.app"]
    assert cycles(router) == []


@pytest.mark.parametrize(
    "module", ["wa_router.admin", "wa_router.metrics", "wa_router.statuspage", "wa_router.views"]
)
def test_the_operators_side_sees_views_not_the_wiring(module: str) -> None:
    """The admin API, the metrics and the status page read a `RouterView` and act through a
    `Control`: they import neither the router's wiring nor the parts that route."""
    reach = graph()[module]
    wiring = {"wa_router.app", "wa_router.runtime", "wa_router.reload", "wa_router.cli"}
    routing = {"wa_router.h1", "wa_router.forward", "wa_router.resolve", "wa_router.directory"}
    assert not reach & wiring
    if module != "wa_router.views":  # views names the parts' counter types, nothing else
        assert not reach & routing
