"""Helpers every audit shares: crash-safe writes, input hashes, library versions.

Crash-safe writes come from ``safelm.files`` (public API); what is here is the audits' own:
JSON without NaN, library versions, the report folder and the one report writer. Every report
file is written to a temporary name and renamed, so a failed or interrupted audit never leaves a
half-written report next to a good one.
"""

from __future__ import annotations

import json
import math
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from safelm.errors import UserError
from safelm.files import atomic_write_bytes, atomic_write_text  # noqa: F401 (re-exported)
from safelm.hashing import file_sha256

VERSIONED = ("safelm", "fairlearn", "numpy", "pandas", "scikit-learn", "scipy", "matplotlib",
             "torch")


sha256_file = file_sha256  # input hashes in every report (safelm's torch-free helper)


def versions(*extra: str) -> dict[str, str]:
    """Versions of Python and the libraries that shape an audit's numbers (plus ``extra``)."""
    out = {"python": platform.python_version()}
    for name in (*VERSIONED, *extra):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars become Python numbers and NaN/inf become ``null``
    (JSON has no NaN, and a report must load in any JSON reader)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def prepare_out_dir(out: str | Path) -> Path:
    """Create the report folder (reports in it are replaced file by file, atomically)."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {p} exists and is a file; give a folder for the report")
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_report(report: dict[str, Any], out: str | Path, *, markdown: str, html: str
                 ) -> dict[str, Path]:
    """The one writer of every audit's report: ``report.json``, ``report.md`` and the
    self-contained ``report.html`` in ``out``. Everything is rendered before this is called,
    and each file is written atomically, so a failure leaves no half-written report."""
    d = prepare_out_dir(out)
    paths = {"json": d / "report.json", "md": d / "report.md", "html": d / "report.html"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["md"], markdown)
    atomic_write_text(paths["html"], html)
    return paths
