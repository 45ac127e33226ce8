"""The module rules of the package, checked by parsing its imports (every import, also inside functions).

- statistics come before objectives: ``tokens`` imports no other tokenpo module but ``utils``;
- objectives are pure: ``objectives`` imports ``tokens`` (and ``utils``) only — no model, provider, trainer or data code;
- providers know no trainer, evaluation or task;
- the trainer and the evaluation never test a method's name (no objective name in their code, except the default
  of ``TrainConfig.method``);
- figures never train: ``plots`` and ``tasks/*/figures`` import neither the trainer nor providers;
- no import cycle between tokenpo modules, and no module ``__getattr__`` re-exports.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tokenpo.objectives import OBJECTIVES

PACKAGE = Path(__file__).resolve().parents[1] / "lib" / "tokenpo"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The tokenpo modules `name` imports (absolute and relative, at any depth of the file)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from pkg import name` the package pkg
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:        # `from pkg import name`: the module or the package
                target = target.rpartition(".")[0]
            if target.startswith("tokenpo") and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_the_imports():
    assert "tokenpo.tokens" in GRAPH["tokenpo.objectives"]
    assert "tokenpo.providers.base" in GRAPH["tokenpo.providers.mapo"]          # a relative import
    assert "tokenpo.training.step" in GRAPH["tokenpo.training.trainer"]


def test_statistics_come_before_objectives():
    assert GRAPH["tokenpo.tokens"] <= {"tokenpo.utils"}


def test_objectives_are_pure_functions_of_statistics():
    assert GRAPH["tokenpo.objectives"] <= {"tokenpo.tokens", "tokenpo.utils"}


@pytest.mark.parametrize("name", [n for n in MODULES if _under(n, "tokenpo.providers")])
def test_providers_know_no_trainer(name):
    bad = {m for m in GRAPH[name] if _under(m, "tokenpo.training", "tokenpo.evaluation", "tokenpo.tasks",
                                            "tokenpo.reproduce", "tokenpo.report")}
    assert not bad, f"{name} imports {sorted(bad)}"


@pytest.mark.parametrize("name", [n for n in MODULES if n == "tokenpo.plots" or n.endswith(".figures")])
def test_figures_never_train(name):
    bad = {m for m in GRAPH[name] if _under(m, "tokenpo.training", "tokenpo.providers", "tokenpo.objectives")}
    assert not bad, f"{name} imports {sorted(bad)}"


def _method_names_in(path: Path) -> list[tuple[int, str]]:
    names = set(OBJECTIVES)
    tree = ast.parse(path.read_text())
    allowed = set()
    for node in ast.walk(tree):                     # TrainConfig's default method is a value, not a branch
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "method":
            allowed.add(id(node.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in allowed]


@pytest.mark.parametrize("name", [n for n in MODULES if _under(n, "tokenpo.training", "tokenpo.evaluation")])
def test_trainer_and_evaluation_never_name_a_method(name):
    assert not _method_names_in(MODULES[name]), f"{name} names methods at (line, name) {_method_names_in(MODULES[name])}"


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_getattr_reexports(name):
    tree = ast.parse(MODULES[name].read_text())
    assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), name


def test_the_rules_can_fail():
    """The checks above see what they look for (a rule that never fires proves nothing)."""
    assert ("tokenpo.providers.base" in GRAPH["tokenpo.providers"]) and GRAPH["tokenpo.training.step"] & {
        "tokenpo.providers", "tokenpo.providers.activations"}
    config = MODULES["tokenpo.training.config"]
    tree = ast.parse(config.read_text())
    assert any(isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "method" for n in ast.walk(tree))
    assert _method_names_in(MODULES["tokenpo.objectives"])          # the registry is full of names
