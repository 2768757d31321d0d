"""The package's own import graph, read from the source with ``ast`` (nothing is imported).

Two rules:

- no import cycle among ``byol_wrapper`` modules, counting the imports executed when a module is imported (at
  module level, including under ``if``/``try``; ``if TYPE_CHECKING:`` blocks excluded). Imports inside functions
  run later, on a call, so they cannot make a cycle at import time; they are left out of the cycle check but do
  count for the second rule.
- no library module imports the command line (``byol_wrapper.cli`` or ``byol_wrapper.train``), at any level: the
  library must work, and be importable, without it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "byol_wrapper"
COMMAND_LINE = ("byol_wrapper.cli", "byol_wrapper.train")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules imported when ``name`` is imported, modules imported anywhere in it), package modules only."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    at_import: set[str] = set()
    anywhere: set[str] = set()

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        found: set[str] = set()
        if isinstance(node, ast.Import):
            bases = [a.name for a in node.names]
            candidates = bases
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            # `from X import y`: y may be a submodule (X.y) or a name defined in X
            candidates = [base_name] + [f"{base_name}.{a.name}" for a in node.names]
        for c in candidates:
            # importing a.b.c imports a, a.b and a.b.c
            parts = c.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in known and prefix != name:
                    found.add(prefix)
        return found

    def walk(nodes: list[ast.stmt], module_level: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found = targets(node)
                anywhere.update(found)
                if module_level:
                    at_import.update(found)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(node.body, False)  # runs on a call, not at import
            elif isinstance(node, ast.If) and _is_type_checking(node):
                walk(node.body, False)  # never runs
                walk(node.orelse, module_level)
            else:  # if/try/with/for/class bodies run at import time
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.stmt):
                        walk([child], module_level)
                    elif isinstance(child, ast.ExceptHandler):
                        walk(child.body, module_level)

    walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body, True)
    return at_import, anywhere


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    known = set(modules)
    at_import, anywhere = {}, {}
    for name, path in modules.items():
        at_import[name], anywhere[name] = _imports(name, path, known)
    return at_import, anywhere


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_edges_removed(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drops the edges from a module to the packages that contain it (importing ``a.b.c`` imports ``a`` and ``a.b``
    first, which is no cycle of the code's making: a package's ``__init__`` re-exporting its submodules is normal)."""
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def test_the_parser_sees_the_package() -> None:
    at_import, anywhere = _graph()
    assert "byol_wrapper.byol" in at_import and "byol_wrapper.cli.trainer" in at_import
    assert "byol_wrapper.byol" in at_import["byol_wrapper"]  # the package re-exports BYOL
    assert "byol_wrapper.cli.trainer" in at_import["byol_wrapper.cli"]
    assert "byol_wrapper.backbones" in at_import["byol_wrapper.cli.trainer"]


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_package_modules() -> None:
    at_import, _ = _graph()
    cycles = _cycles(_package_edges_removed(at_import))
    assert not cycles, f"import cycles among byol_wrapper modules (module-level imports): {cycles}"


@pytest.mark.parametrize("command_line", COMMAND_LINE)
def test_no_library_module_imports_the_command_line(command_line: str) -> None:
    _, anywhere = _graph()
    library = {m for m in anywhere if not any(m == c or m.startswith(c + ".") for c in COMMAND_LINE)}
    offenders = sorted(m for m in library if any(d == command_line or d.startswith(command_line + ".") for d in anywhere[m]))
    assert not offenders, f"library modules importing {command_line}: {offenders}; import byol_wrapper.backbones etc. instead"
