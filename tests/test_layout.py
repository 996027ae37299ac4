"""The package's layout: subpackages in the study's order, imports only one way, no import circle (function-level
imports included: a lazy import hides a circle from Python, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

import featint_utils

PACKAGE = Path(featint_utils.__file__).parent
ORDER = ("data", "dictionary", "residual", "integration", "plots", "workbench")
"""The subpackages in the order of featint_utils' docstring: each may import only those before it."""
SHARED = {"io", "params", "progress", "scalars", "stats"}
"""The modules beside the subpackages, which every part uses and which import no subpackage."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source (top level or inside a function)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:
                        targets.add(f"{source}.{alias.name}")
                    elif source in modules:
                        targets.add(source)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules}
        graph[name] = targets - {name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_the_graph_sees_function_level_imports():
    # planted_truth imports the clamping readout at the top and models' mean_pool: both edges are there
    graph = import_graph()
    assert "featint_utils.integration.clamping" in graph["featint_utils.workbench.planted_truth"]
    # a lazy import inside a function (corpus reads hub_failure_reason from models only when a load fails)
    assert "featint_utils.data.models" in graph["featint_utils.data.corpus"]


def test_no_import_circle():
    assert _circles(import_graph()) == []


def test_the_circle_check_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_subpackages_import_only_those_before_them_and_the_shared_modules():
    graph = import_graph()
    assert set(ORDER) | SHARED | {"__main__", ""} == {_part(m) for m in graph}
    upward = []
    for module, targets in graph.items():
        part = _part(module)
        for target in targets:
            other = _part(target)
            if part in SHARED:
                allowed = other in SHARED
            elif part in ORDER:
                allowed = other in SHARED or other == "" or ORDER.index(other) <= ORDER.index(part)
            else:  # the package itself and its command line
                allowed = True
            if not allowed:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_module_over_550_lines():
    long = {_module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 550}
    assert long == {}
