"""The integration package is a one-way chain: no import cycle, no hidden imports, no run-time classes."""

from __future__ import annotations

import ast
from pathlib import Path

import hf_efficient.integrations as integrations

FOLDER = Path(integrations.__file__).parent
# Each module may import only modules before it.
CHAIN = ["plan", "configurations", "surgery", "attention_interface", "cache", "export", "models", "fused_layers",
         "architectures",
         "patch", "configs", "__init__"]


def _tree(name: str) -> ast.Module:
    return ast.parse((FOLDER / f"{name}.py").read_text(encoding="utf-8"))


def _sibling_imports(node: ast.AST) -> set[str]:
    out = set()
    for item in ast.walk(node):
        if isinstance(item, ast.ImportFrom) and item.level == 1:
            out.add(item.module or "")
    return out


def test_modules_import_only_earlier_ones():
    assert sorted(CHAIN) == sorted(p.stem for p in FOLDER.glob("*.py"))
    for position, name in enumerate(CHAIN):
        for imported in _sibling_imports(_tree(name)):
            assert imported in CHAIN[:position], f"{name} imports .{imported}, which comes later in the chain"


def test_no_function_level_imports_of_siblings():
    for name in CHAIN:
        for node in ast.walk(_tree(name)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert not _sibling_imports(node), f"{name}.{node.name} imports a sibling inside a function"


def test_no_registration_at_import_and_no_classes_made_at_run_time():
    for name in CHAIN:
        tree = _tree(name)
        for statement in tree.body[1:]:  # after the docstring: definitions only, no calls with side effects
            assert not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)), (
                f"{name} calls {ast.unparse(statement)} at import")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type":
                assert len(node.args) == 1, f"{name} builds a class with type(...) at run time"
