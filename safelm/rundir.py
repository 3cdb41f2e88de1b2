"""The run dir: weights, config, tokenizer, metrics and resume state, written crash-safely.

Layout (docs/design.md)::

    model.safetensors   latest weights (unwrapped: no Opacus ``_module.`` prefix)
    config.json         the full resolved config
    tokenizer.json      the byte-level BPE tokenizer
    metrics.jsonl       one JSON object per logged step / evaluation
    checksums.json      sha256 of weights, config, tokenizer, privacy.json (load_run checks)
    resume/             model, optimizer, scheduler, RNG states, data position (+ accountant)

Every file is written to a temporary name and renamed, so a killed or failed command never
leaves a half-written file. ``resume/`` is several files that must agree with each other, so it
is built whole in ``resume.tmp/`` and swapped in with two renames; if a kill lands between them,
``resume.old/`` is complete and is used. Nothing is unpickled: weights are safetensors, and the
optimizer and RNG states load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from .config import Config
from .errors import UserError
from .files import atomic_write_json, atomic_write_text  # noqa: F401 (re-exported)
from .hashing import HF_DIR, file_sha256, listed_name_ok  # noqa: F401 (HF_DIR re-exported)

WEIGHTS, CONFIG, TOKENIZER, METRICS, RESUME, PRIVACY = (
    "model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "resume",
    "privacy.json")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside Opacus' GradSampleModule / DDP wrappers."""
    while hasattr(model, "_module") or hasattr(model, "module"):
        model = getattr(model, "_module", None) or getattr(model, "module")
    return model


def save_weights(model: nn.Module, path: str | Path) -> None:
    """safetensors of the unwrapped model (tied weights stored once)."""
    tmp = f"{path}.tmp"
    save_model(unwrap(model), tmp)
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: str | Path) -> None:
    missing, unexpected = load_model(unwrap(model), str(path), strict=True)
    if missing or unexpected:  # strict=True raises first; kept for clarity
        raise UserError(f"{path}: weights do not match the model in config.json")


def save_resume(run_dir: Path, model: nn.Module, tensors: dict[str, Any],
                state: dict[str, Any]) -> None:
    """Write ``resume/`` whole or not at all (see module docstring)."""
    tmp, cur, old = run_dir / f"{RESUME}.tmp", run_dir / RESUME, run_dir / f"{RESUME}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(unwrap(model), str(tmp / WEIGHTS))
    torch.save(tensors, tmp / "state.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    shutil.rmtree(old, ignore_errors=True)
    if cur.exists():
        os.replace(cur, old)
    os.replace(tmp, cur)
    shutil.rmtree(old, ignore_errors=True)


def find_resume(run_dir: Path) -> Path | None:
    for name in (RESUME, f"{RESUME}.old"):
        d = run_dir / name
        if (d / "state.json").is_file():
            return d
    return None


def load_resume(run_dir: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    d = find_resume(run_dir)
    if d is None:
        raise UserError(f"{run_dir}: no resume state (resume/state.json); start a new run "
                        "without --resume")
    tensors = torch.load(d / "state.pt", weights_only=True, map_location="cpu")
    state = json.loads((d / "state.json").read_text())
    return d, tensors, state


def read_config(run_dir: str | Path) -> Config:
    p = Path(run_dir)
    if not (p / CONFIG).is_file():
        raise UserError(f"{p}: not a SafeLM run dir (no {CONFIG}); pass the --out of "
                        "'safelm train'")
    return Config.from_dict(json.loads((p / CONFIG).read_text()), source=str(p / CONFIG))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / METRICS
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# ---- checksums: refuse to load a file that changed after it was written ------------------
# ``checksums.json`` ({file name: sha256}) covers the files that ``load_run`` reads or that
# state the privacy claim. It is rewritten (atomically) after every checkpoint, so it always
# describes the published weights. Why: a corrupted or swapped weights file would otherwise
# load silently and be served, audited or released as if it were the trained model. Run dirs
# written before checksums existed have no checksums.json and still load (nothing to compare);
# a release dir is covered by its own ``release.json`` + ``release.sha256`` instead (see
# ``audits/release``). This detects accidental or single-file changes, not an adversary who
# rewrites the listing too: that is what a release's published digest is for.
CHECKSUMS, RELEASE_MANIFEST, RELEASE_SUMS = "checksums.json", "release.json", "release.sha256"
CHECKSUMMED = (WEIGHTS, CONFIG, TOKENIZER, PRIVACY)


def write_checksums(run_dir: str | Path) -> dict[str, str]:
    """Write ``checksums.json`` for the run dir's weights, config, tokenizer (and ledger)."""
    p = Path(run_dir)
    sums = {name: file_sha256(p / name) for name in CHECKSUMMED if (p / name).is_file()}
    atomic_write_json(p / CHECKSUMS, sums)
    return sums


def _listed_hashes(p: Path) -> list[tuple[str, str, str]]:
    """(listing file, file name, sha256) for every hash the dir's listings claim."""
    out: list[tuple[str, str, str]] = []
    for listing in (CHECKSUMS, RELEASE_MANIFEST):
        if not (p / listing).is_file():
            continue
        try:
            tree = json.loads((p / listing).read_text(encoding="utf-8"))
            files = tree if listing == CHECKSUMS else tree["files"]
            out += [(listing, str(k), str(v)) for k, v in files.items()]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{p / listing}: unreadable file list (not the JSON that SafeLM "
                            "writes); refusing to load a dir whose integrity cannot be checked"
                            ) from None
    if (p / RELEASE_MANIFEST).is_file():
        if not (p / RELEASE_SUMS).is_file():
            raise UserError(f"{p / RELEASE_SUMS}: missing from a release dir; refusing to load "
                            "it (run 'safelm verify' on the dir)")
        for line in (p / RELEASE_SUMS).read_text(encoding="utf-8", errors="replace").splitlines():
            digest, _, name = line.partition("  ")
            out.append((RELEASE_SUMS, name, digest))
    return out


def verify_checksums(run_dir: str | Path) -> int:
    """Raise :class:`UserError` if a file's sha256 differs from what a listing says.

    Returns the number of files checked (0 for an older run dir without listings).
    """
    p = Path(run_dir)
    listed, seen = _listed_hashes(p), {}
    for listing, name, expected in listed:
        f = p / name
        if not listed_name_ok(name):
            raise UserError(f"{p / listing}: lists {name!r}, which is not a file in this dir; "
                            "refusing to load it")
        if not f.is_file():
            raise UserError(f"{f}: listed in {listing} but missing; refusing to load it")
        actual = seen[name] = seen.get(name) or file_sha256(f)
        if actual != expected:
            raise UserError(f"{f}: hash mismatch (sha256 {actual[:16]}..., {listing} lists "
                            f"{expected[:16]}...); the file changed after it was written, so "
                            "it is not loaded (restore it, or resume an interrupted run)")
    return len(listed)
