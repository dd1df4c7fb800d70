"""Imports run one way: no cycles, nothing imported from a layer above, no private names borrowed.

The layer table lives in one place, the import-linter contract in pyproject.toml
(`[[tool.importlinter.contracts]]`, type "layers"); `make lint` runs import-linter on it, and this
test reads the same table so the suite holds the rule even where import-linter is not installed.
Every `import` statement counts, the ones inside functions included: an import moved into a
function to dodge a cycle is still an edge of the graph.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before Python 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "tegaki"

# Private names another module may still import, each with the reason. Empty is the goal.
PRIVATE_IMPORTS_ALLOWED: set[tuple[str, str]] = set()  # {(importing module, "tegaki.x._name")}


# -------------------------------------------------------------------------------------------------
# Reading the tree and the contract
# -------------------------------------------------------------------------------------------------


def module_files() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its __init__.py)."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


@dataclass(frozen=True)
class Import:
    importer: str  # the module holding the statement
    imported: str  # the tegaki module it makes Python load
    line: int
    names: tuple[str, ...] = ()  # the names taken by `from imported import ...`


def _resolve_from(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module of `from X import ...`, relative imports included."""
    if not node.level:
        return node.module or ""
    package = importer if (MODULES[importer].name == "__init__.py") else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: str) -> list[Import]:
    """Every import of a tegaki module that `module` makes, at any depth of its code."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found.append(Import(module, alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(module, node)
            if source.split(".")[0] != PACKAGE:
                continue
            found.append(Import(module, source, node.lineno, tuple(a.name for a in node.names)))
            for alias in node.names:  # `from tegaki.train import loop` loads tegaki.train.loop too
                if f"{source}.{alias.name}" in MODULES:
                    found.append(Import(module, f"{source}.{alias.name}", node.lineno))
    return found


ALL_IMPORTS = [imp for module in MODULES for imp in imports_of(module)]


def layers_contract() -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = config["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in contracts if c["type"] == "layers"]
    return contract


CONTRACT = layers_contract()


def layer_ranks() -> dict[str, int]:
    """Each layer's top-level module name -> its rank (0 = the top, `cli`)."""
    ranks = {}
    for rank, layer in enumerate(CONTRACT["layers"]):
        for name in re.split(r"[|:]", layer):
            ranks[name.strip().strip("()").strip()] = rank
    return ranks


RANKS = layer_ranks()
# The module's own part of the tree: "tegaki.train.loop" -> "train"; the root facade and
# `python -m tegaki` sit outside the layers.
OUTSIDE_LAYERS = {PACKAGE, f"{PACKAGE}.__main__"}


def component(module: str) -> str:
    return module.split(".")[1]


def allowed_by_contract() -> set[tuple[str, str]]:
    """The contract's `ignore_imports` ("tegaki.a -> tegaki.b"): the known violations the
    redesign is removing, each commented in pyproject.toml."""
    pairs = set()
    for rule in CONTRACT.get("ignore_imports", []):
        importer, imported = (side.strip() for side in rule.split("->"))
        pairs.add((importer, imported))
    return pairs


ALLOWED = allowed_by_contract()


def is_allowed(imp: Import) -> bool:
    return (imp.importer, imp.imported) in ALLOWED


# -------------------------------------------------------------------------------------------------
# The rules
# -------------------------------------------------------------------------------------------------


def test_every_module_has_a_layer():
    unplaced = sorted(
        m
        for m in MODULES
        if m not in OUTSIDE_LAYERS
        and component(m) not in RANKS
        and component(m) not in CONTRACT.get("exhaustive_ignores", [])
    )
    assert not unplaced, f"modules in no layer of pyproject.toml's layers contract: {unplaced}"


def test_imports_only_go_down_the_layers():
    upward = []
    for imp in ALL_IMPORTS:
        if imp.importer in OUTSIDE_LAYERS or imp.imported in OUTSIDE_LAYERS or is_allowed(imp):
            continue
        src, dst = component(imp.importer), component(imp.imported)
        if src == dst or src not in RANKS or dst not in RANKS:
            continue  # inside one part of the tree; an unplaced module fails the test above
        if RANKS[dst] <= RANKS[src]:  # the same layer counts: siblings in a layer are independent
            upward.append(f"{MODULES[imp.importer].relative_to(ROOT)}:{imp.line}: {imp.importer} -> {imp.imported}")
    assert not upward, "imports against the layer order (see pyproject.toml):\n" + "\n".join(upward)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def import_graph(skip_allowed: bool) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in ALL_IMPORTS:
        if imp.imported in MODULES and imp.imported != imp.importer and not (skip_allowed and is_allowed(imp)):
            edges[imp.importer].add(imp.imported)
    return edges


def test_no_import_cycles():
    cycles = find_cycles(import_graph(skip_allowed=True))
    assert not cycles, "import cycles (function-level imports count):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_from_other_modules():
    borrowed = []
    for imp in ALL_IMPORTS:
        for name in imp.names:
            private = name.startswith("_") and not name.startswith("__")
            allowed = (imp.importer, f"{imp.imported}.{name}") in PRIVATE_IMPORTS_ALLOWED
            if private and imp.imported != imp.importer and not allowed:
                borrowed.append(f"{MODULES[imp.importer].relative_to(ROOT)}:{imp.line}: {imp.imported}.{name}")
    assert not borrowed, "private names imported from another module:\n" + "\n".join(borrowed)


def test_the_allow_list_holds_only_real_imports():
    """An entry the code no longer needs is taken off the list, so the list only shrinks."""
    present = {(imp.importer, imp.imported) for imp in ALL_IMPORTS}
    stale = sorted(f"{a} -> {b}" for a, b in ALLOWED - present)
    assert not stale, f"ignore_imports entries with no such import any more; remove them: {stale}"


# -------------------------------------------------------------------------------------------------
# The checker checks: it sees what it must see
# -------------------------------------------------------------------------------------------------


def test_the_graph_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    code = (
        "import tegaki.config\n"
        "from . import rope\n"
        "def f():\n"
        "    from tegaki.train import _private\n"
        "    import tegaki.errors as e\n"
    )
    fake = tmp_path / "model.py"
    fake.write_text(code)
    monkeypatch.setitem(MODULES, "tegaki.model", fake)
    found = {(imp.imported, imp.names) for imp in imports_of("tegaki.model")}
    assert found == {
        ("tegaki.config", ()),
        ("tegaki", ("rope",)),
        ("tegaki.rope", ()),
        ("tegaki.train", ("_private",)),
        ("tegaki.errors", ()),
    }


def test_cycles_are_found():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(edges) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("layer", ["cli", "analysis", "load", "model", "config", "errors"])
def test_the_contract_names_the_layers(layer):
    assert layer in RANKS
    assert RANKS["cli"] < RANKS["analysis"] < RANKS["load"] < RANKS["model"] < RANKS["config"] < RANKS["errors"]


@pytest.mark.parametrize("readme", ["README.md", "README.ja.md"])
def test_the_readmes_layer_line_is_the_contract(readme):
    """The READMEs spell the layers out for readers; they must be the contract's, in its order."""
    text = " ".join((ROOT / readme).read_text(encoding="utf-8").split())
    assert " > ".join(CONTRACT["layers"]) in text
