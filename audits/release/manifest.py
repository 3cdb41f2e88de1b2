"""The release manifest: how every byte of a release dir is protected, and its schema.

Why two files. ``release.json`` cannot hold its own hash, and a self-hash over "canonical"
JSON would let whitespace edits through. So:

* ``release.json`` has ``files``: ``{name: sha256}`` for every file of the release except
  ``release.json`` and ``release.sha256``;
* ``release.sha256`` lists every file except itself, ``release.json`` included, one line
  ``<sha256>  <name>`` each, sorted by name (``sha256sum`` format: ``cd DIR && sha256sum -c
  release.sha256`` checks a release without SafeLM).

``verify`` demands that the dir holds exactly these files (no extra, none missing), that every
hash matches, and that ``release.sha256`` is byte for byte the listing it would write itself.
So a changed byte in a model file breaks its hash in both listings, one in ``release.json``
breaks its line in ``release.sha256``, and one in ``release.sha256`` breaks the byte-exact
comparison. The sha256 of ``release.sha256`` is the release digest: publish it (or sign the
file) to make the release tamper-evident against someone who rewrites every listing.

``release.sha256.sig`` (``--sign``) is the one file no listing covers: it signs
``release.sha256`` and so cannot be listed in it. It may be present in any release (one can be
signed afterwards with stock ``ssh-keygen -Y sign``); it must be present when release.json's
``integrity.signature`` says the release was signed, so deleting it fails integrity too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safelm.hashing import HF_DIR, file_sha256, listed_name_ok

SCHEMA_VERSION = 1
KIND = "safelm-release"
# The same names as safelm.rundir.RELEASE_MANIFEST / RELEASE_SUMS (which load_run checks);
# repeated so that verify does not import torch through safelm.rundir.
RELEASE_JSON, SUMS, SIG = "release.json", "release.sha256", "release.sha256.sig"
CARD_MD, CARD_HTML = "MODEL_CARD.md", "MODEL_CARD.html"
HEX = set("0123456789abcdef")

# Top-level keys of release.json and the types each must have (None: JSON null allowed).
SCHEMA: dict[str, tuple[type | None, ...]] = {
    "schema_version": (int,), "kind": (str,), "name": (str,), "created": (str,),
    "files": (dict,), "integrity": (dict,), "intended_use": (dict,), "model": (dict,),
    "data": (dict,), "training": (dict,), "privacy": (dict,),
    "empirical_privacy_audit": (dict, None), "fairness_audit": (dict, None),
    "evaluation": (dict,), "versions": (dict,), "seeds": (dict,),
}
PRIVACY_KEYS = ("enabled", "epsilon", "delta", "unit", "accountant", "sampling",
                "max_grad_norm", "history", "target_epsilon", "recomputed_epsilon")
DATA_KEYS = ("description", "sha256", "rows", "blocks")
MODEL_KEYS = ("task", "arch", "n_parameters")


def sums_text(hashes: dict[str, str]) -> str:
    """The exact bytes of ``release.sha256`` for ``hashes`` (sha256sum format, sorted)."""
    return "".join(f"{hashes[name]}  {name}\n" for name in sorted(hashes))


def is_sha256(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and set(x) <= HEX


def read_manifest(release: Path) -> dict[str, Any] | None:
    """release.json as a dict, or None when it is missing or not a JSON object."""
    try:
        tree = json.loads((release / RELEASE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return tree if isinstance(tree, dict) else None


def check_integrity(release: Path, manifest: dict[str, Any] | None) -> list[str]:
    """Every problem with the bytes of ``release``: extra, missing or changed files."""
    problems: list[str] = []
    present, odd_set = set(), set()
    for p in release.iterdir():
        inner = [p] if p.name != HF_DIR or p.is_symlink() or not p.is_dir() else list(p.iterdir())
        for q in inner:
            name = q.relative_to(release).as_posix()
            present.add(name)
            if not q.is_file() or q.is_symlink():
                odd_set.add(name)
    odd = sorted(odd_set)
    problems += [f"{n} is not a plain file" for n in odd]
    files = manifest.get("files") if manifest else None
    if not isinstance(files, dict):
        files = {}
        problems.append(f"{RELEASE_JSON} is missing or unreadable, or has no 'files' map")
    expected = set(files) | {RELEASE_JSON, SUMS}
    integrity = manifest.get("integrity") if manifest else None
    if isinstance(integrity, dict) and integrity.get("signature"):
        expected.add(SIG)  # declared signed: removing the signature is a missing file
    problems += [f"extra file {n}" for n in sorted(present - expected - {SIG})
                 if n not in odd]
    problems += [f"missing file {n}" for n in sorted(expected - present)]
    actual = {n: file_sha256(release / n) for n in sorted(expected & present) if n not in odd
              and n not in (SUMS, SIG)}
    for name, digest in sorted(files.items()):
        if name in actual and actual[name] != digest:
            problems.append(f"{name}: sha256 differs from {RELEASE_JSON}")
    if SUMS in present and SUMS not in odd and RELEASE_JSON in actual:
        if (release / SUMS).read_bytes() != sums_text(actual).encode("ascii"):
            problems.append(f"{SUMS} does not match the files (a changed {RELEASE_JSON} "
                            f"or {SUMS})")
    return problems


def check_schema(manifest: dict[str, Any] | None, release: Path) -> list[str]:
    """Every way release.json departs from the schema this module documents."""
    if manifest is None:
        return [f"{RELEASE_JSON} is missing or not a JSON object"]
    problems = [f"missing key {k}" for k in SCHEMA if k not in manifest]
    for key, types in SCHEMA.items():
        v = manifest.get(key)
        if key in manifest and not (v is None and None in types or
                                    isinstance(v, tuple(t for t in types if t))):
            problems.append(f"{key} has the wrong type ({type(v).__name__})")
    if problems:
        return problems
    if manifest["schema_version"] != SCHEMA_VERSION or manifest["kind"] != KIND:
        problems.append(f"schema_version {manifest['schema_version']!r} / kind "
                        f"{manifest['kind']!r}; this verifier reads {KIND} {SCHEMA_VERSION}")
    problems += [f"files[{n!r}] is not a sha256" for n, h in manifest["files"].items()
                 if not is_sha256(h)]
    problems += [f"files[{n!r}] is not a file name of this release (a plain name or "
                 f"{HF_DIR}/<name>)" for n in manifest["files"] if not listed_name_ok(n)]
    for section, keys in (("privacy", PRIVACY_KEYS), ("data", DATA_KEYS),
                          ("model", MODEL_KEYS)):
        problems += [f"{section}.{k} missing" for k in keys if k not in manifest[section]]
    return problems + _privacy_consistency(manifest, release)


def _privacy_consistency(manifest: dict[str, Any], release: Path) -> list[str]:
    """The privacy claim in release.json must be the one in the released privacy.json."""
    priv = manifest["privacy"]
    ledger_path = release / "privacy.json"
    if not priv.get("enabled"):
        return ["privacy.json present but privacy.enabled is false"] if ledger_path.is_file() \
            else []
    try:
        ledger = json.loads(ledger_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["privacy.enabled is true but privacy.json is missing or unreadable"]
    return [f"privacy.{k} ({priv.get(k)!r}) differs from privacy.json ({ledger.get(k)!r})"
            for k in ("epsilon", "delta", "unit", "accountant", "history")
            if priv.get(k) != ledger.get(k)]
