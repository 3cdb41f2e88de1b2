"""The adapter to torch's and Opacus' private names (safelm/privacy/internals.py) still fits
the installed libraries. When this fails, its message names the broken assumption: fix
internals.py (and only it) before trusting DP-SGD on the new versions."""

from __future__ import annotations

import ast
from pathlib import Path

from safelm.privacy import internals

ROOT = Path(__file__).resolve().parents[1]


def test_every_assumption_about_torch_and_opacus_holds():
    problems = internals.check()
    assert not problems, "torch/Opacus changed under SafeLM:\n" + "\n".join(problems)


def test_the_check_catches_a_changed_library(monkeypatch):
    """Planted: a library without a relied-on name is reported, by name."""
    monkeypatch.setattr(internals, "_mark_as_processed", None)
    monkeypatch.setitem(internals.SUPPORTED, "opacus", "0.0")
    problems = internals.check()
    assert any("_mark_as_processed" in p for p in problems), problems
    assert any(p.startswith("opacus ") and "supports opacus 0.0" in p for p in problems)


def _private_library_names(path: Path) -> list[str]:
    """`x._name` attribute reads and `from lib import _name` imports of torch/opacus names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] in ("torch", "opacus"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1 \
                and isinstance(node.args[1], ast.Constant) and str(node.args[1].value) \
                .startswith(("_saved_", "_step_skip", "_is_last_step", "_adjusted_noise")):
            found.append(f"{ast.unparse(node)} (line {node.lineno})")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Name) and base.id in ("torch", "opacus", "optimizer") \
                    or node.attr.startswith(("_saved_", "_step_skip", "_is_last_step")):
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


def test_no_other_module_touches_library_internals():
    offenders = {}
    for pkg in ("safelm", "federation", "audits"):
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name == "internals.py":
                continue
            names = _private_library_names(path)
            if names:
                offenders[str(path.relative_to(ROOT))] = names
    assert not offenders, f"private torch/Opacus names outside safelm/privacy/internals.py: " \
                          f"{offenders}"
