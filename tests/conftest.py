"""Fixtures shared by the test modules, and the marks that sort tests into tiers.

`make test-fast` leaves out what is slow by nature. A test is marked from what its code reaches
(its own body, the module's helpers and fixtures it uses, and the module's top level), so a new
test lands in the right tier without anyone remembering to mark it:

    oracle       needs transformers (the reference it is checked against; a multi-second import)
    subprocess   starts Python processes (`python -m tegaki ...`, `sys.executable -c`)
    distributed  starts several ranks (torchrun, torch.distributed.run)
    slow         a long end-to-end check: marked by hand, or listed in SLOW below
"""

from __future__ import annotations

import ast
import functools
import inspect
import warnings
from pathlib import Path

import pytest
import torch

# Slow by measurement (several seconds each on two cores) and end-to-end by nature: node id
# prefix -> why. Everything else is marked from its code.
SLOW = {
    "tests/test_compare.py": "trains several presets under identical conditions (about 10 s)",
    "tests/test_train.py::test_truncated_checkpoint_falls_back_then_stops_cleanly": "trains, damages, resumes (6 s)",
}
TIERS = {
    "oracle": "needs transformers, the reference implementation (left out by make test-fast)",
    "subprocess": "starts Python processes (left out by make test-fast)",
    "distributed": "starts several ranks with torchrun (left out by make test-fast)",
}


def pytest_configure(config):
    for name, meaning in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


def _signs(nodes: list[ast.AST]) -> set[str]:
    """The tiers a piece of test code belongs to, from the modules, names and strings it uses."""
    found = set()
    for node in (n for root in nodes for n in ast.walk(root)):
        imported = []
        if isinstance(node, ast.Import):
            imported = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported = [(node.module or "").split(".")[0]]
        name = node.id if isinstance(node, ast.Name) else None
        text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None
        sys_executable = (
            isinstance(node, ast.Attribute)
            and node.attr == "executable"
            and (isinstance(node.value, ast.Name) and node.value.id == "sys")
        )
        if "transformers" in (*imported, name, text):  # text: pytest.importorskip("transformers")
            found.add("oracle")
        if "subprocess" in (*imported, name) or sys_executable:
            found.add("subprocess")
        if text in ("torch.distributed.run", "torchrun"):
            found.add("distributed")
    return found


@functools.cache
def _module_tree(path: str) -> tuple[dict[str, ast.AST], set[str]]:
    """(module-level functions and classes by name, the tiers of the module's top level)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    top_level = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    top_signs = _signs(top_level) - {"subprocess"}  # `import subprocess` at the top marks only its users
    return defs, top_signs


@functools.cache
def _tiers_of(path: str, name: str) -> frozenset[str]:
    """The tiers of test `name`: what it reaches through module-level helpers and fixtures."""
    defs, top_signs = _module_tree(path)
    seen, todo, reached = set(), [name], []
    while todo:
        current = todo.pop()
        if current in seen or current not in defs:
            continue
        seen.add(current)
        node = defs[current]
        reached.append(node)
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                todo.append(sub.id)  # a helper it calls
            elif isinstance(sub, ast.arg):
                todo.append(sub.arg)  # a fixture it requests
    return frozenset(top_signs | _signs(reached))


def _left_out(config, tiers: set[str]) -> bool:
    """Whether `-m` leaves out a test marked with these tiers (make test-fast does)."""
    markexpr = config.getoption("markexpr", "")
    if not markexpr:
        return False
    try:  # pytest's own reading of -m; where it moved, nothing is left out early
        from _pytest.mark.expression import Expression

        return not Expression.compile(markexpr).evaluate(lambda name, **kwargs: name in tiers)
    except Exception:  # noqa: BLE001
        return False


def pytest_ignore_collect(collection_path, config):
    """A module whose top level already needs a left-out tier (transformers, imported at the top)
    is not imported at all: its import alone costs seconds."""
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        top_signs = _module_tree(str(collection_path))[1]
        if top_signs and _left_out(config, top_signs):
            return True
    return None


def pytest_collection_modifyitems(config, items):
    collected = {item.nodeid.split("::")[0] for item in items}
    for prefix in SLOW:  # a renamed or moved test must not drop out of the slow tier unnoticed
        file = prefix.split("::")[0]
        missing = not (config.rootpath / file).exists()
        if missing or (file in collected and not any(item.nodeid.startswith(prefix) for item in items)):
            message = f"tests/conftest.py: SLOW names {prefix}, which no longer exists"
            warnings.warn(pytest.PytestWarning(message), stacklevel=1)
    for item in items:
        if any(item.nodeid.startswith(prefix) for prefix in SLOW):
            item.add_marker(pytest.mark.slow)
        function = getattr(item, "function", None)
        if function is None:
            continue
        path = inspect.getsourcefile(item.module) if getattr(item, "module", None) else None
        if not path:
            continue
        owner = item.cls.__name__ if getattr(item, "cls", None) else function.__name__
        for tier in sorted(_tiers_of(path, owner)):
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and small matmuls run faster on one thread: on tensors this small a second thread
    only adds synchronisation (about half the CPU time goes to it on two cores), and nothing stalls
    when other work shares the cores. A module opts in with
    pytestmark = pytest.mark.usefixtures("one_thread"); the old count comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def op_calls():
    """op_calls(run, prefix): how many times run() called operators whose profiler name starts with
    prefix (a compiled graph calls kernels by their own names, e.g. "aten::_scaled_dot_product...")."""

    def count(run, prefix: str) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
        return sum(e.count for e in prof.key_averages() if e.key.startswith(prefix))

    return count


@pytest.fixture
def perturb():
    """Move every parameter of a model off its initial value (a norm weight of exactly 1, a zero
    bias or a zero sink would hide a mapping bug), and check that none stayed where it was.
    Sinks get a large spread so they take real attention mass."""

    @torch.no_grad()
    def _perturb(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        for name, p in model.named_parameters():
            spread = 2.0 if "sinks" in name else scale
            p.add_(torch.randn_like(p) * spread)
        unchanged = [name for name, p in model.named_parameters() if (p == before[name]).any()]
        assert not unchanged, f"parameters kept initial values: {unchanged}"
        return model.eval()

    return _perturb
