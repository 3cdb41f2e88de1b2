"""``safelm release``: a run dir -> a self-describing, tamper-evident release dir.

What is released: the weights, config, tokenizer and privacy ledger (copied byte for byte,
checked against the run's ``checksums.json``), ``release.json`` for machines,
``MODEL_CARD.md``/``.html`` for people, ``release.sha256`` (see ``manifest``) and, with
``--sign KEY``, ``release.sha256.sig`` (see ``signing``). What never
is: ``resume/`` (optimizer state: pickles of moments that leak gradients), ``canaries.json``
(the planted secrets), ``data.json`` (a local path), metrics or any row of data.

The dir is built under a temporary name beside ``--out`` and renamed into place at the end,
so a failed release leaves nothing behind and never touches an existing release.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from safelm.errors import UserError
from safelm.hashing import HF_DIR, file_sha256

from ..common import (atomic_write_bytes, atomic_write_json, atomic_write_text, jsonable,
                      versions)
from . import accounting, card, signing, summaries
from .manifest import (CARD_HTML, CARD_MD, KIND, RELEASE_JSON, SCHEMA_VERSION, SUMS,
                       sums_text)

COPIED = ("model.safetensors", "config.json", "tokenizer.json", "privacy.json")
REQUIRED = ("model.safetensors", "config.json", "tokenizer.json")
EXTRA_VERSIONS = ("opacus", "safetensors", "tokenizers", "flwr")


@dataclass
class ReleaseOptions:
    """What a person adds to a release: its name, purpose, limits and the audit reports."""

    name: str | None = None
    intended_use: str | None = None
    out_of_scope: list[str] = field(default_factory=list)
    limitations: list[str] = field(default_factory=list)
    data_description: str | None = None
    fairness_report: str | Path | None = None
    privacy_audit: str | Path | None = None
    allow_unbound_report: bool = False  # attach reports not bound to these weights (said so)
    sign_key: str | Path | None = None  # OpenSSH private key: write release.sha256.sig


def check_out(out: Path) -> None:
    """Refuse an existing non-empty ``--out``: a release is never overwritten or merged."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; releases are never "
                        "overwritten: choose a new --out")


def release(run_dir: str | Path, out: str | Path, options: ReleaseOptions | None = None
            ) -> dict[str, Any]:
    """Build the release of ``run_dir`` in ``out``; returns release.json's content."""
    from safelm.api import load_run  # torch: imported only when a release is built
    src, out, opts = Path(run_dir), Path(out), options or ReleaseOptions()
    check_out(out)
    if not src.is_dir():
        raise UserError(f"{src}: no such run dir; pass the --out of 'safelm train'")
    missing = [n for n in REQUIRED if not (src / n).is_file()]
    if missing:
        raise UserError(f"{src}: missing {', '.join(missing)}; not a finished run dir")
    run = load_run(src, device="cpu")  # also refuses files whose checksums do not match
    # A key that cannot sign (not a key, encrypted without an agent) is refused before
    # anything is built: a probe is signed, and its key's fingerprint goes into release.json.
    key_fp = signing.check_key(opts.sign_key) if opts.sign_key else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        hashes = _copy_files(src, tmp)
        hf_hashes, hf_note = _hf_copy(src, tmp, run)
        manifest = describe(src, run, {**hashes, **hf_hashes}, opts)
        manifest["huggingface"] = hf_note
        if key_fp:
            manifest["integrity"]["signature"] = {
                "file": signing.SIG, "format": "sshsig", "namespace": signing.NAMESPACE,
                "key_fingerprint": key_fp, "check": signing.CHECK}
        write_release(tmp, manifest)
        if key_fp:
            atomic_write_bytes(tmp / signing.SIG,
                               signing.sign(opts.sign_key, (tmp / SUMS).read_bytes()))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the release from others
        check_out(out)
        if out.exists():
            out.rmdir()  # empty (checked just above); rename needs the name free
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _copy_files(src: Path, dst: Path) -> dict[str, str]:
    """Copy the released files; their copies must hash as the run's checksums say."""
    listed = {}
    if (src / "checksums.json").is_file():
        listed = json.loads((src / "checksums.json").read_text(encoding="utf-8"))
    hashes = {}
    for name in COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            hashes[name] = file_sha256(dst / name)
            if name in listed and listed[name] != hashes[name]:
                raise UserError(f"{src / name}: hash mismatch with checksums.json while "
                                "copying (is a training still writing this run?)")
    return hashes


def _hf_copy(src: Path, dst: Path, run: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """The transformers copy of the model under ``hf/`` (``safelm export hf``), hashed like
    every other file; skipped, and said so, without transformers or for an LSTM."""
    if run.cfg.model.arch != "transformer":
        return {}, {"exported": False, "reason": "model.arch=lstm has no transformers "
                                                 "equivalent"}
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {}, {"exported": False, "reason": "transformers not installed when released "
                                                 "(pip install 'safelm[hf]')"}
    from safelm.hf import export_hf
    export_hf(src, dst / HF_DIR)
    hashes = {f"{HF_DIR}/{p.name}": file_sha256(p) for p in sorted((dst / HF_DIR).iterdir())}
    auto = ("AutoModelForCausalLM" if run.cfg.train.task == "lm"
            else "AutoModelForSequenceClassification")
    return hashes, {"exported": True, "dir": HF_DIR, "load": f"transformers.{auto}"
                    f".from_pretrained('{HF_DIR}'); AutoTokenizer.from_pretrained('{HF_DIR}')",
                    "inputs": "[bos_token_id] + tokenizer(text).input_ids"}


def describe(src: Path, run: Any, hashes: dict[str, str], opts: ReleaseOptions
             ) -> dict[str, Any]:
    """release.json without the card hashes (added by :func:`write_release`)."""
    from safelm.rundir import read_metrics
    cfg = run.cfg
    ledger = json.loads((src / "privacy.json").read_text()) if "privacy.json" in hashes else None
    privacy = accounting.privacy_section(ledger)
    weights, unbound = hashes["model.safetensors"], opts.allow_unbound_report
    fair = (summaries.fairness_summary(opts.fairness_report, weights, unbound)
            if opts.fairness_report else None)
    emp = (summaries.privacy_audit_summary(opts.privacy_audit, weights, unbound)
           if opts.privacy_audit else None)
    model = {"task": cfg.train.task, "arch": cfg.model.arch, "n_layer": cfg.model.n_layer,
             "n_head": cfg.model.n_head, "d_model": cfg.model.d_model,
             "block_size": cfg.model.block_size, "vocab_size": cfg.model.vocab_size,
             "num_classes": cfg.model.num_classes, "labels": list(cfg.data.labels),
             "tie_weights": cfg.model.tie_weights,
             "n_parameters": sum(p.numel() for p in run.model.parameters())}
    t = cfg.train
    return jsonable({
        "schema_version": SCHEMA_VERSION, "kind": KIND,
        "name": opts.name or f"{src.resolve().name} ({cfg.train.task}, "
                             f"{'DP' if ledger else 'non-private'})",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": dict(hashes),
        "integrity": {"algorithm": "sha256", "sums_file": SUMS,
                      "files_cover": f"every file except {RELEASE_JSON} and {SUMS}",
                      "sums_cover": f"every file except {SUMS} ({RELEASE_JSON} included)",
                      "digest": f"sha256 of {SUMS}; publish it to pin this release"},
        "intended_use": card.intended_use(cfg, ledger, fair, emp, opts),
        "model": model, "data": summaries.data_fingerprint(src, cfg, opts.data_description),
        "training": {"epochs": t.epochs, "max_steps": t.max_steps, "batch_size": t.batch_size,
                     "lr": t.lr, "weight_decay": t.weight_decay, "optimizer": "AdamW",
                     "steps": ledger.get("steps") if ledger else None,
                     "federated": (src / "federation.json").is_file()},
        "privacy": privacy, "empirical_privacy_audit": emp, "fairness_audit": fair,
        "evaluation": summaries.evaluation(read_metrics(src)),
        "versions": _versions(ledger), "seeds": _seeds(src, cfg),
    })


def _versions(ledger: dict[str, Any] | None) -> dict[str, Any]:
    """Library versions at release time, and what the run itself recorded of training's."""
    out: dict[str, Any] = versions()
    for name in EXTRA_VERSIONS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    out["training"] = {"opacus": ledger.get("opacus_version")} if ledger else {}
    return out


def _seeds(src: Path, cfg: Any) -> dict[str, Any]:
    seeds: dict[str, Any] = {"train.seed": cfg.train.seed,
                             "data_split": f"train.seed ({cfg.train.seed})"}
    fed = src / "federation.json"
    if fed.is_file():
        rc = json.loads(fed.read_text(encoding="utf-8"))
        seeds.update({f"federation.{k}": v for k, v in rc.items()
                      if "seed" in str(k) and isinstance(v, (int, str))})
    return seeds


def write_release(d: Path, manifest: dict[str, Any]) -> None:
    """Cards, release.json (whose ``files`` then covers the cards), release.sha256."""
    atomic_write_text(d / CARD_MD, card.markdown(manifest))
    atomic_write_text(d / CARD_HTML, card.html_page(manifest))
    for name in (CARD_MD, CARD_HTML):
        manifest["files"][name] = file_sha256(d / name)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    atomic_write_json(d / RELEASE_JSON, manifest)
    hashes = {**manifest["files"], RELEASE_JSON: file_sha256(d / RELEASE_JSON)}
    atomic_write_text(d / SUMS, sums_text(hashes))
