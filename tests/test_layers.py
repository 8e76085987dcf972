"""The layering rule of README's Development section, checked on every import statement of the package
(top-level and inside functions): a module imports its own package and lower layers only."""

from __future__ import annotations

import ast
from pathlib import Path

import vitcli

PACKAGE = Path(vitcli.__file__).parent

# Top to bottom. Two packages of one layer do not import each other (models and data stay independent).
LAYERS = [
    {"__main__"},
    {"cli", "__init__"},
    {"bench", "inspect", "predict", "export"},
    {"engine"},
    {"objectives"},
    {"models", "data"},
    {"io", "recipe", "recipe_files", "rng"},
    {"errors"},
]
RANK = {part: depth for depth, parts in enumerate(LAYERS) for part in parts}


def part_of(path: Path) -> str:
    """The top-level module or package a file of vitcli belongs to: 'engine', 'recipe', '__init__' ..."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_parts(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level part of vitcli) for every import of vitcli in a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("vitcli.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = node.module.split(".")
            if names[0] != "vitcli":
                continue
            if len(names) > 1:
                found.append((node.lineno, names[1]))
            else:  # from vitcli import data / errors / create_model
                found += [(node.lineno, a.name if a.name in RANK else "__init__") for a in node.names]
    return found


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = part_of(path)
        assert mine in RANK, f"{path} belongs to no layer: add '{mine}' to LAYERS (and to README's Development section)"
        for line, theirs in imported_parts(ast.parse(path.read_text(), str(path))):
            assert theirs in RANK, f"{path}:{line} imports vitcli.{theirs}, which is in no layer"
            if theirs != mine and RANK[theirs] <= RANK[mine]:
                bad.append(f"{path.relative_to(PACKAGE)}:{line} ({mine}) imports vitcli.{theirs}")
    return bad


def test_imports_point_down_the_layers():
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule is not vacuous: a models module importing the engine, even inside a function, is caught."""
    fake = tmp_path / "vitcli"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "bad.py").write_text("def f():\n    from vitcli.engine.trainer import train\n")
    (fake / "data").mkdir()
    (fake / "data" / "ok.py").write_text("from vitcli.io.hub import offline_reason\nfrom vitcli import errors\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert violations() == ["models/bad.py:2 (models) imports vitcli.engine"]
