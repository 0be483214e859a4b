"""No import cycles inside `collector/` and `eastwest/`: the modules' imports, read with `ast`,
form a graph without loops.

Every `import` counts wherever it stands, in a function too: a function-level import that
closes a loop hides the cycle, it does not remove it. Only imports under `if TYPE_CHECKING:`
do not count (they never run). `from pkg import name` counts as an import of `pkg.name` when
that is a module, else of `pkg`; a package's own `__init__` is not an implicit import of each
of its submodules' parents (importing `a.b.c` runs `a/b/__init__.py`, which may import
`a.b.c` back: Python allows that, and it is how a package re-exports its parts).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("collector", "eastwest")


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.Module, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of `modules` that `module` imports."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:  # a submodule, else an attribute of `base`
                sub = f"{base}.{alias.name}"
                names.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in names if name in modules and name != module}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {module: imports(ast.parse(path.read_text(), str(path)), module,
                            path.name == "__init__.py", set(files))
            for module, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def test_collector_and_eastwest_have_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_check_sees_a_cycle_closed_inside_a_function_and_ignores_type_checking():
    def graph_of(sources: dict[str, str]) -> dict[str, set[str]]:
        return {m: imports(ast.parse(src), m, False, set(sources)) for m, src in sources.items()}

    hidden = {"p.a": "from p.b import X\n",
              "p.b": "def f():\n    from p.a import Y\n    return Y\n"}
    assert cycles(graph_of(hidden)) == [["p.a", "p.b"]]
    typing_only = {"p.a": "from p.b import X\n",
                   "p.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                          "    from p.a import Y\n"}
    assert cycles(graph_of(typing_only)) == []
    relative = {"p.a": "from .b import X\n", "p.b": "from . import a\n"}
    assert cycles(graph_of(relative)) == [["p.a", "p.b"]]
