"""lossfloor's import graph: no circle between its modules, and no import against the layering
that docs/architecture.md writes down ("Layering rules"), read from there by this test.

The graph is built with ``ast`` from every module under src/lossfloor: every import of a
lossfloor module, at module level or inside a function (a function-local import runs too, only
later), plus the package ``__init__`` that importing a submodule runs (``import a.b.c`` runs
``a/b/__init__.py``; not for the importer's own packages, which Python has already started).
Imports under ``if TYPE_CHECKING:`` never run, so they form no circle and are left out of the
cycle check; they still name a dependency of the code, so the layering applies to them too.
``from lossfloor import __version__`` reads the one constant the root package defines before
anything else; it stands for the node ``lossfloor.__version__`` (bottom layer), while every
other import of the root package is an import of its public face (top layer).
"""

from __future__ import annotations

import ast
import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
VERSION_NODE = "lossfloor.__version__"


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``line`` of ``path`` (``type_only``: under
    TYPE_CHECKING)."""

    source: str
    target: str
    path: Path
    line: int
    type_only: bool

    def __str__(self) -> str:
        kind = " (TYPE_CHECKING)" if self.type_only else ""
        return f"{self.path}:{self.line}: {self.source} imports {self.target}{kind}"


@dataclass(frozen=True)
class Layer:
    """A row of the layering table: its name, module patterns (``optimal`` stands for
    ``lossfloor.optimal`` and its submodules) and whether its modules may import each other."""

    name: str
    patterns: tuple[str, ...]
    within: bool

    def rank(self, module: str) -> tuple[int, bool] | None:
        """How specifically a pattern of this layer names ``module`` (more dots, then no
        wildcard, wins), or None if none does."""
        ranks = [
            (pattern.count(".") + (pattern != "lossfloor"), "*" not in pattern)
            for pattern in self.patterns
            if _matches(module, pattern)
        ]
        return max(ranks, default=None)


def _matches(module: str, pattern: str) -> bool:
    """``pattern`` (relative to lossfloor; "lossfloor": the root package alone) names
    ``module`` or one of its packages."""
    if pattern == "lossfloor":
        return module == "lossfloor"
    full = f"lossfloor.{pattern}"
    return fnmatch.fnmatchcase(module, full) or fnmatch.fnmatchcase(module, full + ".*")


def modules_of(src: Path, package: str) -> dict[str, Path]:
    """Module name → file of every .py file of ``package`` under ``src``."""
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of ``tree`` (at any depth) and whether it is under TYPE_CHECKING."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append((node, type_only))
        if isinstance(node, ast.If) and _type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(tree, False)
    return found


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names ``node`` imports (relative imports resolved), before matching them to
    modules."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    return [f"{origin}.{alias.name}" for alias in node.names]


def _module_for(name: str, modules: dict[str, Path], root: str) -> str | None:
    """The module a dotted name imports: itself, else its longest prefix that is a module
    (``from a.b import f``: a.b); ``from <root> import __version__`` is VERSION_NODE."""
    if name == f"{root}.__version__":
        return VERSION_NODE
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(src: Path, package: str) -> list[Edge]:
    """Every import between the modules of ``package`` (module docstring: what counts)."""
    modules = modules_of(src, package)
    edges: set[Edge] = set()
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node, type_only in _imports(ast.parse(path.read_text(), str(path))):
            for name in _targets(module, is_package, node):
                target = _module_for(name, modules, package)
                if target is None or target == module:
                    continue
                rel = path.relative_to(src.parent)
                edges.add(Edge(module, target, rel, node.lineno, type_only))
                # the packages importing ``target`` runs, outside the importer's own packages
                parts = target.split(".")
                for end in range(2, len(parts)):
                    parent = ".".join(parts[:end])
                    if not (module + ".").startswith(parent + ".") and parent in modules:
                        edges.add(Edge(module, parent, rel, node.lineno, type_only))
    return sorted(edges, key=lambda e: (e.source, e.target, e.line))


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One circle (its edges, in order) per strongly connected component of more than one
    module, over the imports that run (TYPE_CHECKING left out); Tarjan's algorithm."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        if not e.type_only:
            graph.setdefault(e.source, []).append(e)
            graph.setdefault(e.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # recursion depth ≤ the number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph[v]:
            if e.target not in index:
                connect(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_circle(sorted(c)[0], set(c), graph) for c in components]


def _circle(start: str, members: set[str], graph: dict[str, list[Edge]]) -> list[Edge]:
    """The shortest path of edges from ``start`` back to itself inside ``members`` (BFS)."""
    paths: dict[str, list[Edge]] = {start: []}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for e in graph[v]:
            if e.target == start:
                return paths[v] + [e]
            if e.target in members and e.target not in paths:
                paths[e.target] = paths[v] + [e]
                queue.append(e.target)
    raise AssertionError(f"no circle through {start}")  # a component of >1 module has one


def read_layers(markdown: str) -> list[Layer]:
    """The table under the heading "Layering rules" of ``markdown``: | layer | modules |
    imports within |, bottom first; modules in backticks; "imports within" yes or no."""
    section = re.search(r"^#+ Layering rules\s*$(.*?)(?=^#+ |\Z)", markdown, re.M | re.S)
    assert section is not None, "docs/architecture.md has no 'Layering rules' section"
    layers = []
    for row in re.findall(r"^\|(.+)\|\s*$", section.group(1), re.M):
        cells = [c.strip() for c in row.split("|")]
        if len(cells) != 3 or not re.findall(r"`([^`]+)`", cells[1]):
            continue  # the header and its rule
        assert cells[2] in ("yes", "no"), f"layer {cells[0]}: 'imports within' must be yes/no"
        layers.append(Layer(cells[0], tuple(re.findall(r"`([^`]+)`", cells[1])), cells[2] == "yes"))
    assert layers, "the 'Layering rules' section has no table of layers"
    return layers


def layer_of(module: str, layers: list[Layer]) -> int:
    """The index of the layer whose pattern names ``module`` most specifically
    (``scaling.collection`` before ``scaling``, ``cli.common`` before ``cli.*``)."""
    if module == VERSION_NODE:
        return 0
    ranked = [(r, i) for i, layer in enumerate(layers) if (r := layer.rank(module)) is not None]
    assert ranked, f"{module} is in no layer of docs/architecture.md's Layering rules"
    best = max(r for r, _ in ranked)
    held = [layers[i].name for r, i in ranked if r == best]
    assert len(held) == 1, f"{module} is in several layers: {held}"
    return next(i for r, i in ranked if r == best)


def layering_violations(edges: list[Edge], layers: list[Layer]) -> list[str]:
    """Each import from a lower layer into a higher one, or between two modules of a layer
    whose modules may not import each other, as one line naming the file and line."""
    found = []
    for e in edges:
        a, b = layer_of(e.source, layers), layer_of(e.target, layers)
        if b > a:
            found.append(f"{e}: layer '{layers[a].name}' imports layer '{layers[b].name}'")
        elif a == b and not layers[a].within and e.source != e.target:
            found.append(f"{e}: modules of layer '{layers[a].name}' do not import each other")
    return found


# ----- lossfloor -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> list[Edge]:
    return import_graph(SRC, "lossfloor")


def test_lossfloor_has_no_import_circle(graph):
    found = cycles(graph)
    text = "\n\n".join("\n".join(str(e) for e in circle) for circle in found)
    assert not found, f"import circles:\n{text}"


def test_every_module_is_in_one_layer_of_the_architecture_doc():
    layers = read_layers(ARCHITECTURE.read_text())
    for module in modules_of(SRC, "lossfloor"):
        layer_of(module, layers)  # raises for a module in no layer


def test_no_import_breaks_the_layering_of_the_architecture_doc(graph):
    found = layering_violations(graph, read_layers(ARCHITECTURE.read_text()))
    assert not found, "imports against docs/architecture.md's Layering rules:\n" + "\n".join(found)


def test_the_graph_sees_function_local_and_type_only_imports(graph):
    """Two imports known to be there (inside ``cli/scaling.py``'s ``run``; ``Diagnosis`` under
    TYPE_CHECKING in ``floor/reading.py``, which also imports diagnosis in a function), so an empty
    graph cannot pass the tests above."""
    pair = ("lossfloor.cli.scaling", "lossfloor.scaling.collection")
    local = [e for e in graph if (e.source, e.target) == pair]
    assert local and not local[0].type_only
    pair = ("lossfloor.floor.reading", "lossfloor.diagnosis")
    typed = [e for e in graph if (e.source, e.target) == pair]
    assert {e.type_only for e in typed} == {True, False}


# ----- the checker on a synthetic package ---------------------------------------------------
SYNTHETIC_LAYERS = """
## Layering rules
| layer | modules | imports within |
|---|---|---|
| base | `low` | yes |
| commands | `cli` | no |
| face | `lossfloor` | yes |
"""


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "src" / "lossfloor" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "src"


def test_the_checker_reports_a_circle_through_a_function_local_import(tmp_path):
    src = _package(tmp_path, {
        "__init__.py": "__version__ = '0'\n",
        "low.py": "from lossfloor import __version__\n\n"
                  "def f():\n    from lossfloor.cli import a\n",
        "cli/__init__.py": "",
        "cli/a.py": "from lossfloor.low import f\n",
    })  # fmt: skip
    found = cycles(import_graph(src, "lossfloor"))
    assert len(found) == 1
    assert {(e.source, e.target) for e in found[0]} == {
        ("lossfloor.low", "lossfloor.cli.a"),
        ("lossfloor.cli.a", "lossfloor.low"),
    }
    assert str(found[0][0]).startswith("src/lossfloor/cli/a.py:1:")


def test_the_checker_leaves_type_only_imports_out_of_circles_but_not_out_of_the_layering(
    tmp_path,
):
    src = _package(tmp_path, {
        "__init__.py": "",
        "low.py": "from typing import TYPE_CHECKING\n"
                  "if TYPE_CHECKING:\n    from lossfloor.cli import a\n",
        "cli/__init__.py": "",
        "cli/a.py": "from lossfloor.low import x\n",
    })  # fmt: skip
    edges = import_graph(src, "lossfloor")
    assert cycles(edges) == []
    found = layering_violations(edges, read_layers(SYNTHETIC_LAYERS))
    assert found == [  # the package cli/__init__.py the import runs, and cli/a.py
        "src/lossfloor/low.py:3: lossfloor.low imports lossfloor.cli (TYPE_CHECKING): "
        "layer 'base' imports layer 'commands'",
        "src/lossfloor/low.py:3: lossfloor.low imports lossfloor.cli.a (TYPE_CHECKING): "
        "layer 'base' imports layer 'commands'",
    ]


def test_the_checker_refuses_upward_imports_and_commands_importing_each_other(tmp_path):
    src = _package(tmp_path, {
        "__init__.py": "__version__ = '0'\n",
        "low.py": "import lossfloor.cli\nfrom lossfloor import __version__\n",
        "cli/__init__.py": "",
        "cli/a.py": "from lossfloor.cli.b import g\nfrom lossfloor import __version__\n",
        "cli/b.py": "from lossfloor.low import f\nfrom lossfloor import main\n",
    })  # fmt: skip
    found = layering_violations(import_graph(src, "lossfloor"), read_layers(SYNTHETIC_LAYERS))
    assert found == [
        "src/lossfloor/cli/a.py:1: lossfloor.cli.a imports lossfloor.cli.b: "
        "modules of layer 'commands' do not import each other",
        "src/lossfloor/cli/b.py:2: lossfloor.cli.b imports lossfloor: "
        "layer 'commands' imports layer 'face'",
        "src/lossfloor/low.py:1: lossfloor.low imports lossfloor.cli: "
        "layer 'base' imports layer 'commands'",
    ]


def test_the_checker_counts_the_package_init_an_import_runs(tmp_path):
    """``from lossfloor.pkg.b import x`` runs pkg/__init__.py, which imports a module that
    imports the importer: a circle, although no file imports the importer's file directly
    from pkg.b."""
    src = _package(tmp_path, {
        "__init__.py": "",
        "pkg/__init__.py": "from lossfloor.pkg.c import y\n",
        "pkg/b.py": "",
        "pkg/c.py": "from lossfloor.low import z\n",
        "low.py": "from lossfloor.pkg.b import x\n",
    })  # fmt: skip
    found = cycles(import_graph(src, "lossfloor"))
    assert [[(e.source, e.target) for e in c] for c in found] == [[
        ("lossfloor.low", "lossfloor.pkg"),
        ("lossfloor.pkg", "lossfloor.pkg.c"),
        ("lossfloor.pkg.c", "lossfloor.low"),
    ]]  # fmt: skip


def test_the_checker_lets_a_command_import_its_own_parts_and_no_other_commands(tmp_path):
    """A command package's parts (``cli.*.*``) sit below the commands: ``cli.a`` imports its part
    ``cli.a.part``; ``cli.b`` importing that part runs the package ``cli.a``, a command."""
    layers = read_layers(SYNTHETIC_LAYERS.replace(
        "| commands |", "| parts | `cli.*.*` | yes |\n| commands |"
    ))  # fmt: skip
    src = _package(tmp_path, {
        "__init__.py": "",
        "low.py": "",
        "cli/__init__.py": "",
        "cli/a/__init__.py": "def run():\n    from lossfloor.cli.a.part import f\n",
        "cli/a/part.py": "from lossfloor.low import g\nfrom lossfloor.cli.a.other import h\n",
        "cli/a/other.py": "",
        "cli/b.py": "from lossfloor.cli.a.part import f\n",
    })  # fmt: skip
    found = layering_violations(import_graph(src, "lossfloor"), layers)
    assert found == [
        "src/lossfloor/cli/b.py:1: lossfloor.cli.b imports lossfloor.cli.a: "
        "modules of layer 'commands' do not import each other",
    ]
