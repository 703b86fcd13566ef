"""The package's imports point one way: no module of `nencache` reaches itself through its imports.

The graph is read from the source with `ast`, so every `nencache` import counts: at module level, inside
functions (lazy imports) and under `if TYPE_CHECKING:`. A lazy import hides a cycle from Python's import
machinery, not from the design. An edge goes to the module named (`from nencache.a import b` reaches
`nencache.a.b` when that is a module, else `nencache.a`); packages' `__init__` are nodes like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import nencache

ROOT = Path(nencache.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the `nencache` modules it imports anywhere in its source."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:  # `import nencache.a.b.C`-style names: the module holding it
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component of more than one module (Tarjan, then BFS)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [shortest_cycle(graph, set(c), c[0]) for c in components]


def shortest_cycle(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"{start} is in a component but on no cycle")


def test_the_graph_is_read_from_the_source() -> None:
    graph = import_graph()
    assert "nencache.net.protocol" in graph["nencache.net.wire"]  # a module-level import
    assert "nencache.server.admin" in graph["nencache.server.server"]  # a function-level import


def test_cycles_are_found_and_reported() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles (each shown once, shortest first found):\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in found)


# Layers that must not import upwards: (importer prefix, forbidden prefix).
_DOWNWARD = [
    ("nencache.tiers", "nencache.server"),
    ("nencache.tiers", "nencache.p2p"),
    ("nencache.net", "nencache.server"),
    ("nencache.net", "nencache.tiers"),
    ("nencache.net", "nencache.p2p"),
    ("nencache.net", "nencache.cache"),
    ("nencache.codecs", "nencache.lmcache_compat"),
]


@pytest.mark.parametrize(("importer", "forbidden"), _DOWNWARD, ids=[f"{a}-not-{b}" for a, b in _DOWNWARD])
def test_layers_import_downwards(importer: str, forbidden: str) -> None:
    wrong = sorted(f"{name} -> {target}" for name, targets in import_graph().items()
                   if name == importer or name.startswith(importer + ".")
                   for target in targets if target == forbidden or target.startswith(forbidden + "."))
    assert not wrong, f"{importer} must not import {forbidden}:\n  " + "\n  ".join(wrong)
