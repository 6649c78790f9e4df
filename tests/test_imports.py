"""The package graph has no cycles: mech's packages import each other in one direction only (the README's map).

Every import counts, at module level and inside functions (a function-level import hides a cycle from Python's
loader but not from the reader), so the test reads the source instead of importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mech

ROOT = Path(mech.__file__).parent


def _unit(module: str) -> str:
    """The package (or top-level module) a dotted mech module belongs to: mech.students.train -> students."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mech"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mech.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "mech":  # from mech import organism
                found |= {f"mech.{a.name}" for a in node.names}
            elif node.module.startswith("mech."):
                found.add(node.module)
    return found


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        src = _unit(".".join(rel.parts).removesuffix(".__init__"))
        deps = {_unit(m) for m in _imports(path)} - {src, "mech", "errors"}
        graph.setdefault(src, set()).update(deps)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_packages():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle among mech's packages: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_leaves_import_nothing_from_mech():
    graph = package_graph()
    for leaf in ("paths", "errors", "store"):
        assert graph.get(leaf, set()) <= {"paths"}, f"mech.{leaf} must stay a leaf, imports {graph[leaf]}"
