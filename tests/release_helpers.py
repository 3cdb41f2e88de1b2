"""Helpers shared by the release tests: run the CLI in-process, read its verdicts."""

from __future__ import annotations

import hashlib
from pathlib import Path

from safelm.cli import main


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def cli(capsys, *args) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, (rc, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def failed_gates(out: str) -> set[str]:
    return {ln.split()[1].rstrip(":") for ln in out.splitlines() if ln.startswith("FAIL ")}
