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


# ---- federation and audits use only safelm's public API --------------------------------------
def public_api() -> tuple[set[str], dict[str, set[str]]]:
    """(public module names, public names per module) from safelm/__init__.py: a module of
    _EXPORTS offers the names re-exported from it, a PUBLIC_MODULES module its listed names;
    ``safelm`` itself offers __all__ and the public modules."""
    import safelm
    per: dict[str, set[str]] = {}
    for mod, names in safelm._EXPORTS.items():
        per.setdefault(mod, set()).update(names)
    for mod, names in safelm.PUBLIC_MODULES.items():
        per.setdefault(mod, set()).update(names)
    per[""] = set(safelm.__all__) | set(per)
    return set(per) - {""}, per


def private_uses(path: Path, source: str | None = None) -> list[str]:
    """Every import of a non-public safelm name in one file, and every attribute read through
    a safelm module imported by name (``rundir.X``), that the public API does not offer."""
    modules, per = public_api()
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"))
    bad, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "safelm":
            sub = node.module[len("safelm."):] if node.module != "safelm" else ""
            if sub not in per:
                bad.append(f"line {node.lineno}: from {node.module} import ... (not a public "
                           "module)")
                continue
            for a in node.names:
                if a.name not in per[sub]:
                    bad.append(f"line {node.lineno}: {node.module}.{a.name} is not public")
                elif sub == "" and a.name in modules:
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("safelm.") and a.name[len("safelm."):] not in modules:
                    bad.append(f"line {node.lineno}: import {a.name} (not a public module)")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases and node.attr not in per[aliases[node.value.id]]:
            bad.append(f"line {node.lineno}: {aliases[node.value.id]}.{node.attr} is not public")
    return bad


@pytest.mark.parametrize("package", ["federation", "audits"])
def test_federation_and_audits_use_only_public_safelm_names(package):
    bad = {str(f.relative_to(ROOT)): private_uses(f) for f in sorted((ROOT / package).rglob("*.py"))}
    assert not {k: v for k, v in bad.items() if v}


def test_public_api_checker_sees_planted_violations():
    src = ("from safelm.trainer import Trainer\n"  # public: fine
           "from safelm.trainer import lr_factor\n"  # planted: private name
           "from safelm.privacy.bk import BKGradSampleModule\n"  # planted: private module
           "from safelm import rundir\n"
           "x = rundir.WEIGHTS\n"  # public
           "y = rundir.save_resume\n")  # planted: not offered
    bad = private_uses(Path("planted.py"), src)
    assert len(bad) == 3, bad
    assert any("lr_factor" in b for b in bad) and any("bk" in b for b in bad) \
        and any("save_resume" in b for b in bad)


def test_every_public_name_exists():
    import importlib
    _, per = public_api()
    for mod, names in per.items():
        if mod:
            m = importlib.import_module(f"safelm.{mod}")
            missing = [n for n in names if not hasattr(m, n)]
            assert not missing, (mod, missing)
