"""The import graph of mqkit/ has no cycle, counting imports under TYPE_CHECKING too."""

from __future__ import annotations

import ast
from pathlib import Path

import mqkit

ROOT = Path(mqkit.__file__).parent


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                if target in mods:
                    deps.add(target)
                subs = (f"{target}.{a.name}" for a in node.names)
                deps.update(sub for sub in subs if sub in mods)
        deps.discard(name)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                found.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_graph_is_read() -> None:
    graph = _graph()
    assert "mqkit.consumer" in graph["mqkit.broker"]
    assert "mqkit.message" in graph["mqkit.seam"]


def test_no_import_cycle_in_mqkit() -> None:
    assert _cycles(_graph()) == []


def test_a_cycle_would_be_found() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_core_parts_do_not_import_the_broker() -> None:
    graph = _graph()
    for name in ("mqkit.consumer", "mqkit.producer", "mqkit.message", "mqkit.owner"):
        assert "mqkit.broker" not in graph[name], name
    assert "mqkit.consumer" not in graph["mqkit.message"]
