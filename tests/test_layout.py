"""The dependency direction of docs/design.md, checked by parsing imports with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"safelm": {"federation", "audits"}, "federation": {"audits"},
             "audits": {"federation"}}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_direction(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    bad = {str(f.relative_to(ROOT)): sorted(imported_top_levels(f) & FORBIDDEN[package])
           for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_checker_sees_a_planted_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import os\nfrom audits.fairness import x\ndef f():\n    import federation\n")
    assert imported_top_levels(f) & {"audits", "federation"} == {"audits", "federation"}
