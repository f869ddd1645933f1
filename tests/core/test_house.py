"""The house's one-way arrows (docs/design.md): core/ imports no steps, storage, defs or dagster; no import circle
among the package's modules; no function-level import of the package's own modules without a comment saying why."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "zlt_dagster"
FORBIDDEN_IN_CORE = ("zlt_dagster.steps", "zlt_dagster.storage", "zlt_dagster.defs", "zlt_dagster.cli", "dagster")


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _in_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports():
    """{module: [(imported module, line, at module level?, has a why-comment?)]} of every runtime import."""
    graph = {}
    for path in sorted(PKG.rglob("*.py")):
        mod, src = _module(path), path.read_text()
        lines = src.splitlines()
        tree = ast.parse(src)
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        out = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, path.name == "__init__.py", node)
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            else:
                continue
            if _in_type_checking(node, parents):
                continue
            top = parents.get(node) is tree
            why = "#" in lines[node.lineno - 1] or "#" in lines[node.lineno - 2]
            out += [(n, node.lineno, top, why) for n in names]
        graph[mod] = out
    return graph


def test_core_imports_nothing_above_it():
    bad = [f"{m}:{line} imports {n}" for m, imps in _imports().items() if m.startswith("zlt_dagster.core")
           for n, line, _, _ in imps if n == "dagster" or n.startswith(FORBIDDEN_IN_CORE)]
    assert not bad, "core/ must stay pure computation:\n" + "\n".join(bad)


def test_no_import_circles():
    graph = _imports()
    mods = set(graph)
    edges = {m: sorted({n for n, *_ in imps if n in mods and n != m}) for m, imps in graph.items()}
    # a package's __init__ importing its own submodules is how a package exposes them, not a circle
    edges = {m: [n for n in ns if not n.startswith(m + ".")] for m, ns in edges.items()}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in edges[m]:
            visit(n)
        stack.pop()

    for m in sorted(mods):
        visit(m)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_function_level_imports_of_the_package_say_why():
    bad = [f"{m}:{line} {n}" for m, imps in _imports().items() for n, line, top, why in imps
           if n.startswith("zlt_dagster") and not top and not why]
    assert not bad, "function-level imports of the package's own modules need a comment saying why:\n" + "\n".join(
        sorted(set(bad)))
