"""The core's shape: `wmdd/` holds only what the five stages import, imports no lab code, its modules
import each other without a cycle, and no function hides an import of a core module (the usual way to
dodge a cycle)."""
from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = os.path.join(REPO, "wmdd")


def core_imports(source: str) -> tuple:
    """({top-level imported core module}, {imported lab/stage module}, [function-level core imports])."""
    tree = ast.parse(source)
    top, foreign, nested = set(), set(), []
    stages = {"squeeze", "barycenter", "recover", "relabel", "evaluate", "lab", "bench", "tests"}

    def names(node) -> list:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "wmdd":
                return [f"wmdd.{a.name}" for a in node.names]
            return [node.module]
        return []

    def visit(node, depth: int) -> None:
        for child in ast.iter_child_nodes(node):
            inner = depth + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            for name in names(child):
                root = name.split(".")[0]
                if root in stages:
                    foreign.add(name)
                elif root == "wmdd" and name.count(".") >= 1:
                    module = name.split(".")[1]
                    if depth:
                        nested.append(module)
                    elif module != "__version__":
                        top.add(module)
            visit(child, inner)

    visit(tree, 0)
    return top, foreign, nested


def graph() -> dict:
    out = {}
    for name in sorted(os.listdir(CORE)):
        if name.endswith(".py"):
            with open(os.path.join(CORE, name)) as fh:
                out[name[:-3]] = core_imports(fh.read())
    return out


def find_cycle(edges: dict):
    state, stack = {}, []

    def dfs(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = dfs(v)
                if found:
                    return found
        stack.pop()
        state[u] = "done"
        return None

    for u in sorted(edges):
        if u not in state:
            found = dfs(u)
            if found:
                return found
    return None


def test_the_checker_sees_cycles_lab_imports_and_nested_imports():
    top, foreign, nested = core_imports("from wmdd import a, b\nimport lab.paper\n"
                                        "def f():\n    from wmdd import c\n    import wmdd.d\n")
    assert top == {"a", "b"} and foreign == {"lab.paper"} and nested == ["c", "d"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_core_has_no_cycle_no_lab_import_and_no_hidden_import():
    g = graph()
    assert {"paper", "report", "embedding"}.isdisjoint(g), "lab modules must live in lab/, not wmdd/"
    for module, (_, foreign, nested) in g.items():
        assert not foreign, f"wmdd/{module}.py imports {sorted(foreign)}: the core must not import lab or stage code"
        nested = [n for n in nested if n in g]  # wmdd._C, the optional compiled extension, is loaded lazily
        assert not nested, f"wmdd/{module}.py imports {nested} inside a function: import at the top"
    edges = {m: {t for t in top if t in g} for m, (top, _, _) in g.items()}
    assert find_cycle(edges) is None, f"import cycle in wmdd/: {' -> '.join(find_cycle(edges))}"


def test_every_core_module_is_imported_by_a_stage():
    g = graph()
    reached, todo = set(), []
    for stage in ("squeeze", "barycenter", "recover", "relabel", "evaluate"):
        with open(os.path.join(REPO, stage + ".py")) as fh:
            todo += sorted(core_imports(fh.read())[0])
    while todo:
        m = todo.pop()
        if m in g and m not in reached:
            reached.add(m)
            todo += sorted(g[m][0])
    unused = sorted(set(g) - reached - {"__init__"})
    assert not unused, f"wmdd/ modules no stage imports (move them to lab/): {unused}"
