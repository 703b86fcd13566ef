"""The layer rule of docs/architecture.md, checked on the source: imports point downwards only.

Every module of the package is placed in one layer; a module may import its own layer and the layers
below it, never one above. Nothing below `integrations/` imports an engine (transformers, vLLM,
SGLang); `codecs/` imports nothing from `compat/`; no module imports itself back through others.
Imports are read with `ast` wherever they are written: at module level, inside functions (lazy
imports), under `TYPE_CHECKING`, and `importlib.import_module("...")` with a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Top first. A module belongs to the layer of the longest prefix that names it ("nencache" names only the
# package's own __init__, its public API).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("commands", ("nencache", "nencache.cli", "nencache.demo", "nencache.bench")),
    ("integrations", ("nencache.integrations",)),
    ("cache", ("nencache.cache", "nencache.pinned", "nencache.metrics")),  # the token-keyed API
    ("assembly", ("nencache.assemble",)),  # config -> tiers -> store, the peer endpoint included
    # `nencache serve`, and the peer endpoint that serves a cache's memory tier over the same protocol
    ("server", ("nencache.server", "nencache.p2p")),  # p2p/: the peer endpoint, a small server
    ("core", ("nencache.store", "nencache.writer", "nencache.stats")),  # the one chunk store
    ("parts", ("nencache.policy", "nencache.tiers", "nencache.net", "nencache.codecs", "nencache.compat",
               "nencache.config_loader")),
    ("ground floor", ("nencache.pool", "nencache.keys", "nencache.format", "nencache.layout", "nencache.config",
                      "nencache.errors", "nencache.sizes", "nencache.copy", "nencache.cpu_dtype", "nencache.workers")),
]
ENGINES = ("transformers", "vllm", "sglang")


@dataclass(frozen=True, slots=True)
class Import:
    """`module` imports `target` (a module of the package, or any top-level name) at `line`."""

    module: str
    target: str
    line: int


def module_files(root: Path) -> dict[str, Path]:
    """Every module under `root` by dotted name (a package by its own name)."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> Iterator[Import]:
    """What `name` imports, wherever in the file the import is written."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Import(name, sub if sub in modules else base, node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield Import(name, node.args[0].value, node.lineno)


def layer_of(module: str) -> int | None:
    """The index in `LAYERS` (0 is the top) of the longest prefix naming `module`."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            nested = "." in prefix and module.startswith(prefix + ".")  # the package itself holds only its __init__
            if (module == prefix or nested) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@dataclass(slots=True)
class Graph:
    """The modules under `root` and every import between them (and out of them)."""

    root: Path
    modules: dict[str, Path]
    edges: list[Import]

    @classmethod
    def of(cls, root: Path) -> Graph:
        modules = module_files(root)
        edges = [edge for name, path in modules.items() for edge in imports_of(name, path, set(modules))]
        return cls(root, modules, list(dict.fromkeys(edges)))

    def where(self, edge: Import) -> str:
        return f"{self.modules[edge.module].relative_to(self.root)}:{edge.line}"

    def unplaced(self) -> list[str]:
        return [name for name in self.modules if layer_of(name) is None]

    def upward(self) -> list[str]:
        found = []
        for edge in self.edges:
            if edge.target not in self.modules and not within(edge.target, "nencache"):
                continue
            mine, theirs = layer_of(edge.module), layer_of(edge.target)
            if mine is not None and theirs is not None and theirs < mine:
                found.append(f"{self.where(edge)}: {edge.module} ({LAYERS[mine][0]}) imports {edge.target} "
                             f"({LAYERS[theirs][0]})")
        return found

    def engine_imports(self) -> list[str]:
        floor = layer_of("nencache.integrations")
        return [f"{self.where(e)}: {e.module} imports {e.target}" for e in self.edges
                if any(within(e.target, engine) for engine in ENGINES)
                and (layer_of(e.module) or 0) > (floor or 0)]

    def between(self, source: str, target: str) -> list[str]:
        return [f"{self.where(e)}: {e.module} imports {e.target}" for e in self.edges
                if within(e.module, source) and within(e.target, target)]

    def cycles(self) -> list[list[str]]:
        """Strongly connected groups of more than one module (Tarjan), each sorted."""
        graph: dict[str, set[str]] = {name: set() for name in self.modules}
        for edge in self.edges:
            if edge.target in self.modules and edge.target != edge.module:
                graph[edge.module].add(edge.target)
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        groups: list[list[str]] = []

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
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))

        for name in sorted(graph):
            if name not in index:
                visit(name)
        return sorted(groups)


@pytest.fixture(scope="module")
def package() -> Graph:
    return Graph.of(SRC)


def test_every_module_has_a_layer(package: Graph) -> None:
    assert package.unplaced() == [], "place each module in LAYERS (and in docs/architecture.md)"


def test_imports_point_downwards(package: Graph) -> None:
    upward = package.upward()
    assert not upward, "imports that point upwards:\n" + "\n".join(upward)


def test_no_engine_imports_below_integrations(package: Graph) -> None:
    engines = package.engine_imports()
    assert not engines, "engine imports below integrations/:\n" + "\n".join(engines)


def test_codecs_import_nothing_from_compat(package: Graph) -> None:
    assert package.between("nencache.codecs", "nencache.compat") == []


def test_no_import_cycles(package: Graph) -> None:
    cycles = package.cycles()
    assert not cycles, "modules that import each other:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_see_lazy_imports_cycles_and_engines(tmp_path: Path) -> None:
    """The checks themselves find what they look for, in a package laid out to break every rule."""
    root = tmp_path / "nencache"
    files = {
        "__init__.py": "",
        "errors.py": "def late():\n    from nencache.tiers import disk\n",  # ground floor -> parts, lazily
        "tiers/__init__.py": "",
        "tiers/disk.py": "import importlib\nimportlib.import_module('nencache.server.store')\n",
        "server/__init__.py": "",
        "server/store.py": "from ..tiers import disk\nimport torch, vllm.config\n",
        "codecs/__init__.py": "from nencache.compat import serde\n",
        "compat/__init__.py": "",
        "compat/serde.py": "",
        "oddity.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = Graph.of(tmp_path)
    assert graph.unplaced() == ["nencache.oddity"]
    assert [line.split(": ", 1)[1] for line in graph.upward()] == [
        "nencache.errors (ground floor) imports nencache.tiers.disk (parts)",
        "nencache.tiers.disk (parts) imports nencache.server.store (server)",
    ]
    assert graph.engine_imports() == ["nencache/server/store.py:2: nencache.server.store imports vllm.config"]
    assert graph.between("nencache.codecs", "nencache.compat") == [
        "nencache/codecs/__init__.py:1: nencache.codecs imports nencache.compat.serde"]
    assert graph.cycles() == [["nencache.server.store", "nencache.tiers.disk"]]
