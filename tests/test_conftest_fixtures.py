"""No test module silently replaces one of conftest.py's autouse fixtures (seed, one thread) with its own."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _fixtures(tree: ast.Module, autouse_only: bool) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for dec in node.decorator_list:
            target = dec.func if isinstance(dec, ast.Call) else dec
            if not (isinstance(target, ast.Attribute) and target.attr == "fixture"):
                continue
            autouse = isinstance(dec, ast.Call) and any(
                k.arg == "autouse" and isinstance(k.value, ast.Constant) and k.value.value is True for k in dec.keywords
            )
            if autouse or not autouse_only:
                names.add(node.name)
    return names


def test_conftest_has_autouse_fixtures() -> None:
    assert {"_seed", "_one_thread"} <= _fixtures(ast.parse((TESTS / "conftest.py").read_text()), autouse_only=True)


def test_no_test_module_redefines_a_conftest_autouse_fixture() -> None:
    autouse = _fixtures(ast.parse((TESTS / "conftest.py").read_text()), autouse_only=True)
    clashes = {
        path.name: sorted(names)
        for path in sorted(TESTS.glob("test_*.py"))
        if (names := _fixtures(ast.parse(path.read_text()), autouse_only=False) & autouse)
    }
    assert not clashes, f"test modules redefine conftest's autouse fixtures (seed them in the test instead): {clashes}"
