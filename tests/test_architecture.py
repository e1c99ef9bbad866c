"""The package's shape: modules a reviewer reads in one sitting, no import cycle, and the two methods
independent of each other (what they share lives outside ``method/``). Read from the source with
``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).parents[1] / "statsmerge_plugin"
MAX_LINES = 450


def modules() -> Dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The package's modules that ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = submodules or [base]  # `from pkg import mod` imports mod, not pkg's names
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # a module's own ancestor packages are always initialised first: not an edge
            if target and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def import_graph() -> Dict[str, Set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_no_module_is_longer_than_450_lines():
    long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    done, stack = set(), []

    def visit(node):  # depth-first; a node met again on the current path closes a cycle
        if node in stack:
            raise AssertionError(
                "import cycle: " + " -> ".join(stack[stack.index(node) :] + [node])
            )
        if node in done:
            return
        stack.append(node)
        for other in sorted(graph[node]):
            visit(other)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


@pytest.mark.parametrize(
    "method, other",
    [("statsmerging", "prodistill"), ("prodistill", "statsmerging")],
)
def test_one_methods_package_never_imports_the_others(method, other):
    graph = import_graph()
    prefix, forbidden = f"statsmerge_plugin.method.{method}", f"statsmerge_plugin.method.{other}"
    offending = {
        name: sorted(t for t in targets if t.startswith(forbidden))
        for name, targets in graph.items()
        if name.startswith(prefix)
    }
    assert not {k: v for k, v in offending.items() if v}


def test_the_graph_sees_relative_and_function_level_imports():
    """The checks above can fail: the graph has the edges they would find."""
    graph = import_graph()
    assert "statsmerge_plugin.mini.store" in graph["statsmerge_plugin.mini.corruptions.splits"]
    assert (
        "statsmerge_plugin.mini.evaluate" in graph["statsmerge_plugin.mini.build"]
    )  # in a function
    assert "statsmerge_plugin.mini.tasks" in graph["statsmerge_plugin.mini.corruptions.splits"]
