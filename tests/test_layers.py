"""Layers are enforced both ways: runtime <- trainer <- export, nothing imports export.

Every import statement of every module is read (function-level ones included, since the
CLI and the trainer import lazily), so a layer violation anywhere fails here, not only on a
machine that lacks the layer.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(folder: str) -> dict[str, set[str]]:
    """``{file: {absolute module names it imports}}`` for every .py under ``folder``."""
    out = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        out[str(path.relative_to(REPO))] = names
    return out


def offenders(folder: str, banned: tuple[str, ...]) -> list[str]:
    return [f"{file}: {name}" for file, names in imported_modules(folder).items() for name in sorted(names)
            if any(name == b or name.startswith(b + ".") for b in banned)]


def test_the_scan_sees_lazy_imports():
    assert "edge_inspect.trainer.config" in imported_modules("export")["export/demo.py"]


def test_runtime_imports_neither_torch_nor_the_other_layers():
    assert offenders("runtime", ("torch", "edge_inspect.trainer", "edge_inspect.export")) == []


def test_trainer_never_imports_export():
    assert offenders("trainer", ("edge_inspect.export",)) == []


def test_nothing_imports_the_project_by_bare_layer_names():
    for folder in ("runtime", "trainer", "export", "tests", "benchmarks"):
        assert offenders(folder, ("runtime", "trainer", "export")) == [], folder
