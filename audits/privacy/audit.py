"""``privacy_audit``: a run dir and two data files in, report.json / .md / .html out.

The verdict: an (epsilon, delta)-DP run must not let any attack beat the trade-off that
epsilon allows. The audit measures a lower bound on epsilon from the attacks (see
``stats.empirical_epsilon``) and compares it with the accountant's epsilon in the run's
``privacy.json``. A lower bound above the claim means the claim is false, which for SafeLM would
be a bug in clipping, noise or accounting: the audit then fails (``passed: false``). A bound
below the claim says nothing good about the claim; it only means no attack here refuted it.

Several attacks are several chances to find a large bound, so each attack's bound is computed
at confidence 1 - (1 - c) / k for k attacks (Bonferroni); their maximum then holds at ``c``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from safelm.errors import UserError

from ..common import prepare_out_dir, sha256_file, versions
from . import attacks, exposure, stats


@dataclass
class PrivacySettings:
    reference_models: int = 2  # even; 0 skips the reference attack
    reference_settings: list[str] = field(default_factory=list)  # --set items for references
    confidence: float = 0.95
    n_boot: int = 1000
    n_candidates: int = 2000  # canary exposure: random secrets each canary is ranked among
    min_rows: int = 20
    seed: int = 0
    claimed_epsilon: float | None = None  # None: privacy.json's epsilon (test another claim)


def read_claim(run_dir: Path) -> dict[str, Any]:
    """The run's privacy claim: privacy.json when DP (epsilon may be null: noise 0)."""
    p = run_dir / "privacy.json"
    if not p.is_file():
        return {"dp": False, "epsilon": None, "delta": None}
    ledger = json.loads(p.read_text(encoding="utf-8"))
    return {"dp": True, "epsilon": ledger.get("epsilon"), "delta": ledger.get("delta"),
            "accountant": ledger.get("accountant"), "unit": ledger.get("unit"),
            "steps": ledger.get("steps"), "noise_multiplier": ledger.get("noise_multiplier")}


def check_settings(st: PrivacySettings) -> None:
    if not 0.5 <= st.confidence < 1:
        raise UserError(f"--confidence {st.confidence}: give a level in [0.5, 1), e.g. 0.95")
    if st.reference_models < 0 or st.reference_models % 2:
        raise UserError(f"--reference-models {st.reference_models}: give an even number "
                        "(pairs on complementary halves of the non-members) or 0")
    if st.n_boot < 0 or 0 < st.n_boot < 10:
        raise UserError(f"--n-boot {st.n_boot}: use 0 (no intervals) or at least 10")
    if st.n_candidates < 10:
        raise UserError(f"--candidates {st.n_candidates}: use at least 10 (1000+ recommended)")
    if st.min_rows < 4:
        raise UserError("--min-rows must be >= 4")


def attack_entry(name: str, scores: np.ndarray, member: np.ndarray, delta: float,
                 st: PrivacySettings, k: int) -> dict[str, Any]:
    roc = stats.roc_summary(scores, member, n_boot=st.n_boot, confidence=st.confidence,
                            seed=st.seed)
    eps = stats.empirical_epsilon(scores, member, delta=delta,
                                  confidence=1 - (1 - st.confidence) / k, seed=st.seed)
    eps["family_confidence"] = st.confidence
    return {"name": name, "description": attacks.DESCRIPTIONS[name], "auc": roc["auc"],
            "tpr_at_fpr": roc["tpr_at_fpr"], "empirical_epsilon": eps,
            "roc": thin_roc(roc["roc"]["fpr"], roc["roc"]["tpr"])}


def thin_roc(fpr: np.ndarray, tpr: np.ndarray, n: int = 400) -> dict[str, list[float]]:
    """At most ~n ROC points, spaced evenly in log FPR (keeps report.json small)."""
    if len(fpr) <= n:
        return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    grid = np.unique(np.r_[0.0, np.geomspace(max(fpr[fpr > 0].min(), 1e-6), 1, n)])
    idx = np.unique(np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, len(fpr) - 1))
    return {"fpr": fpr[idx].tolist(), "tpr": tpr[idx].tolist()}


def verdict(claim: dict[str, Any], claimed: float | None, eps_lb: float,
            delta: float) -> tuple[bool, str]:
    if claimed is None:
        what = ("not DP: no epsilon is claimed" if not claim["dp"]
                else "DP without a finite epsilon (noise 0): nothing to test")
        return True, f"{what}; empirical epsilon lower bound {eps_lb:.2f}"
    if eps_lb > claimed:
        return False, (f"FAILED: empirical epsilon lower bound {eps_lb:.2f} exceeds the claimed "
                       f"epsilon {claimed:.2f} (delta {delta:g}); the DP guarantee does not "
                       "hold: a bug in clipping, noise or accounting, or members and "
                       "non-members from different distributions")
    return True, (f"passed: empirical epsilon lower bound {eps_lb:.2f} <= claimed epsilon "
                  f"{claimed:.2f} (delta {delta:g}); no attack refuted the claim")


def privacy_audit(run_dir: str | Path, members: str | Path, non_members: str | Path,
                  out: str | Path | None = None, *, settings: PrivacySettings | None = None,
                  data_overrides: dict[str, Any] | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Membership-inference and canary audit of ``run_dir``; report.* written into ``out``.

    Returns report.json's content, with ``"_paths"`` {json, md, html} when ``out`` is given.
    Everything is computed before anything is written. Reference models are trained in a
    scratch folder that is removed afterwards.
    """
    from safelm.api import load_run
    st = settings or PrivacySettings()
    check_settings(st)
    run_dir = Path(run_dir)
    target = load_run(run_dir)
    claim = read_claim(run_dir)
    claimed = st.claimed_epsilon if st.claimed_epsilon is not None else claim["epsilon"]
    delta = claim["delta"] if claim["delta"] is not None else target.cfg.privacy.delta
    with tempfile.TemporaryDirectory(prefix="safelm-privacy-") as tmp:
        inputs = attacks.load_inputs(target.cfg, members, non_members, data_overrides or {},
                                     Path(tmp), st.min_rows)
        scores, refs = attacks.attack_scores(
            target, inputs, reference_models=st.reference_models,
            reference_settings=st.reference_settings, seed=st.seed, log=log)
    member = np.r_[np.ones(len(inputs.members), bool), np.zeros(len(inputs.non_members), bool)]
    entries = [attack_entry(name, s, member, delta, st, len(scores))
               for name, s in scores.items()]
    eps_lb = max(e["empirical_epsilon"]["value"] for e in entries)
    passed, line = verdict(claim, claimed, eps_lb, delta)
    record = exposure.read_canaries(run_dir)
    canaries = (exposure.canary_exposure(target, record, n_candidates=st.n_candidates,
                                         seed=st.seed) if record else None)
    report = {
        "kind": "privacy", "run": {"path": str(run_dir), "task": target.cfg.train.task,
                                   "dp": claim["dp"], "privacy": claim},
        "claimed_epsilon": claimed, "delta": delta, "empirical_epsilon": eps_lb,
        "empirical_epsilon_attack": max(entries, key=lambda e: e["empirical_epsilon"]["value"])
        ["name"], "confidence": st.confidence, "passed": passed, "verdict": line,
        "n": {"members": len(inputs.members), "non_members": len(inputs.non_members),
              "dropped_duplicate_non_members": inputs.dropped_duplicates},
        "attacks": entries, "reference_models": refs, "canaries": canaries,
        "settings": {k: v for k, v in vars(st).items()},
        "inputs": input_hashes(run_dir, members, non_members), "versions": versions()}
    if out is not None:
        from .report import write_report
        report["_paths"] = {k: str(v) for k, v in
                            write_report(report, prepare_out_dir(out)).items()}
    return report


def input_hashes(run_dir: Path, members: str | Path, non_members: str | Path) -> dict[str, Any]:
    out = {"members_sha256": sha256_file(members), "non_members_sha256": sha256_file(non_members)}
    for name in ("model.safetensors", "config.json", "privacy.json", exposure.CANARIES_FILE):
        if (run_dir / name).is_file():
            out[f"{name}_sha256"] = sha256_file(run_dir / name)
    out["model_sha256"] = out.get("model.safetensors_sha256")  # the key every report shares
    return out
