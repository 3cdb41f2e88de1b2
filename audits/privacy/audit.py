"""``privacy_audit``: a run dir (and, for membership inference, two data files) in,
report.json / .md / .html out.

Two parts, and only one of them gives a verdict:

* The one-run audit (``--one-run``; ``one_run.py``): canaries each included by an independent
  fair coin, scored by the model, guessed, counted; the paper's binomial bound with the delta
  term gives a lower bound on epsilon that holds at the stated confidence. It is compared with
  the claim *for one canary*: the run's (epsilon, delta) when the privacy unit is the user
  (a canary's copies are one user, ``canary<i>``) or a canary has one row; for k rows under
  example-level DP, group privacy (k eps, k e^{(k-1) eps} delta). A bound above that claim
  means the claim is false (a bug in clipping, noise or accounting): ``passed: false``.
* Membership inference over --members / --non-members (loss and reference attacks) is
  descriptive only: AUC and TPR at low FPR with bootstrap intervals, and no epsilon bound and no
  verdict. A bound from it would treat rows as independent trials of the DP game, and they are
  not: all rows share one model, rows share users, and members are chosen by a split rather
  than by independent coins (docs/platform-notes.md).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from safelm.errors import UserError

from ..common import prepare_out_dir, sha256_file, versions
from . import attacks, exposure, one_run, stats


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
    one_run: bool = False  # the one-run audit over bernoulli canaries
    guesses: list[int] = field(default_factory=list)  # one-run guess totals; [] = default grid


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
    if any(g < 1 for g in st.guesses):
        raise UserError(f"--guesses {st.guesses}: each total must be >= 1 (e.g. 100)")


def attack_entry(name: str, scores: np.ndarray, member: np.ndarray,
                 st: PrivacySettings) -> dict[str, Any]:
    """AUC and TPR at low FPR with bootstrap intervals (descriptive: see the module doc)."""
    roc = stats.roc_summary(scores, member, n_boot=st.n_boot, confidence=st.confidence,
                            seed=st.seed)
    return {"name": name, "description": attacks.DESCRIPTIONS[name], "auc": roc["auc"],
            "tpr_at_fpr": roc["tpr_at_fpr"],
            "roc": thin_roc(roc["roc"]["fpr"], roc["roc"]["tpr"])}


def thin_roc(fpr: np.ndarray, tpr: np.ndarray, n: int = 400) -> dict[str, list[float]]:
    """At most ~n ROC points, spaced evenly in log FPR (keeps report.json small)."""
    if len(fpr) <= n:
        return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    grid = np.unique(np.r_[0.0, np.geomspace(max(fpr[fpr > 0].min(), 1e-6), 1, n)])
    idx = np.unique(np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, len(fpr) - 1))
    return {"fpr": fpr[idx].tolist(), "tpr": tpr[idx].tolist()}


def canary_claim(claim: dict[str, Any], claimed: float | None, delta: float,
                 record: dict[str, Any]) -> dict[str, Any]:
    """The (epsilon, delta) the run promises for one canary, which the one-run bound tests.

    A canary is ``repeats`` rows of one user (``canary<i>``). Under user-level DP that is one
    unit: the run's claim. Under example-level DP it is a group of k = repeats rows, and group
    privacy (Dwork and Roth 2014, Thm 2.2 with delta: Vadhan 2017, Lemma 2.2) gives
    (k eps, k e^{(k-1) eps} delta); that can be vacuous (delta >= 1), and the report says so."""
    k = int(record.get("repeats", 1))
    per_user = claim.get("unit") == "user"
    size = 1 if per_user or k == 1 else k
    out: dict[str, Any] = {"group_size": size, "unit": claim.get("unit") or "none",
                           "run_epsilon": claimed, "run_delta": delta}
    if claimed is None:
        return {**out, "epsilon": None, "delta": delta}
    if size == 1:
        return {**out, "epsilon": claimed, "delta": delta}
    try:
        d = min(1.0, size * math.exp((size - 1) * claimed) * delta)
    except OverflowError:
        d = 1.0
    return {**out, "epsilon": size * claimed, "delta": d}


def verdict(claim: dict[str, Any], tested: dict[str, Any], eps_lb: float) -> tuple[bool, str]:
    """One-run verdict: fails only when the bound exceeds the per-canary claim."""
    eps_c, delta_c = tested["epsilon"], tested["delta"]
    where = ("" if tested["group_size"] == 1 else
             f" (group privacy for a canary of {tested['group_size']} rows)")
    if eps_c is None:
        what = ("not DP: no epsilon is claimed" if not claim["dp"]
                else "DP without a finite epsilon (noise 0): nothing to test")
        return True, f"{what}; one-run epsilon lower bound {eps_lb:.2f}"
    if eps_lb > eps_c:
        return False, (f"FAILED: one-run epsilon lower bound {eps_lb:.2f} exceeds the claimed "
                       f"epsilon {eps_c:.2f}{where} (delta {delta_c:.3g}); the DP guarantee "
                       "does not hold: a bug in clipping, noise or accounting")
    return True, (f"passed: one-run epsilon lower bound {eps_lb:.2f} <= claimed epsilon "
                  f"{eps_c:.2f}{where} (delta {delta_c:.3g}); the audit did not refute the "
                  "claim")


def read_one_run_record(run_dir: Path) -> dict[str, Any]:
    """canaries.json of a bernoulli run, or a UserError naming how to make one."""
    record = exposure.read_canaries(run_dir)
    if not record or record.get("inclusion") != "bernoulli" or "included" not in record:
        have = ("no canaries" if not record else
                f"canaries inserted with inclusion={record.get('inclusion', 'all')!r}")
        raise UserError(f"--one-run: {run_dir} has {have}; the one-run audit needs canaries "
                        "included by fair coins: train an LM with --set privacy.canaries=1000 "
                        "--set privacy.canary_inclusion=bernoulli")
    return record


def one_run_part(target: Any, run_dir: Path, claim: dict[str, Any], claimed: float | None,
                 delta: float, st: PrivacySettings) -> tuple[dict[str, Any], bool, str]:
    """Score every canary by -(total NLL of its text), bound epsilon, judge the claim."""
    record = read_one_run_record(run_dir)
    texts = [f"{record['prefix']} {s}" for s in record["secrets"]]
    scores = -exposure.total_nll(target, texts)
    if not np.all(np.isfinite(scores)):
        raise UserError(f"{run_dir}: some canaries got no score; the run's tokenizer or "
                        "block size cannot hold them (retrain with a larger model.block_size)")
    tested = canary_claim(claim, claimed, delta, record)
    res = one_run.one_run_bound(scores, np.asarray(record["included"], bool),
                                delta=tested["delta"], confidence=st.confidence,
                                guesses=st.guesses or None)
    res.update(score="-(total NLL of the canary text) under the model",
               claimed_epsilon=tested["epsilon"], claim=tested,
               repeats=int(record.get("repeats", 1)))
    passed, line = verdict(claim, tested, res["epsilon_lower_bound"])
    return res, passed, line


def membership_part(target: Any, members: str | Path, non_members: str | Path,
                    st: PrivacySettings, overrides: dict[str, Any],
                    log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict, dict]:
    """The descriptive membership-inference attacks: entries, reference models, counts."""
    with tempfile.TemporaryDirectory(prefix="safelm-privacy-") as tmp:
        inputs = attacks.load_inputs(target.cfg, members, non_members, overrides, Path(tmp),
                                     st.min_rows)
        scores, refs = attacks.attack_scores(
            target, inputs, reference_models=st.reference_models,
            reference_settings=st.reference_settings, seed=st.seed, log=log)
    member = np.r_[np.ones(len(inputs.members), bool), np.zeros(len(inputs.non_members), bool)]
    entries = [attack_entry(name, s, member, st) for name, s in scores.items()]
    n = {"members": len(inputs.members), "non_members": len(inputs.non_members),
         "dropped_duplicate_non_members": inputs.dropped_duplicates}
    return entries, refs, n


MEMBERSHIP_ONLY = ("no verdict: membership inference over --members/--non-members is "
                   "descriptive only (AUC, TPR at low FPR); a valid epsilon bound needs "
                   "--one-run on a run with bernoulli canaries")


def privacy_audit(run_dir: str | Path, members: str | Path | None = None,
                  non_members: str | Path | None = None, out: str | Path | None = None, *,
                  settings: PrivacySettings | None = None,
                  data_overrides: dict[str, Any] | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Privacy audit of ``run_dir``; report.* written into ``out``.

    With ``settings.one_run``: the one-run bound and verdict (members/non-members optional).
    Without: the descriptive membership-inference attacks (both files required).
    Returns report.json's content, with ``"_paths"`` {json, md, html} when ``out`` is given.
    Everything is computed before anything is written. Reference models are trained in a
    scratch folder that is removed afterwards.
    """
    from safelm.api import load_run
    st = settings or PrivacySettings()
    check_settings(st)
    if (members is None) != (non_members is None) or (members is None and not st.one_run):
        raise UserError("give both --members FILE and --non-members FILE (membership "
                        "inference), or --one-run (the canary audit) or both")
    run_dir = Path(run_dir)
    if st.one_run:
        read_one_run_record(run_dir)  # refuse early, before loading or scoring anything
    target = load_run(run_dir)
    claim = read_claim(run_dir)
    claimed = st.claimed_epsilon if st.claimed_epsilon is not None else claim["epsilon"]
    delta = claim["delta"] if claim["delta"] is not None else target.cfg.privacy.delta
    entries, refs, n = [], {"n": 0}, {"members": 0, "non_members": 0}
    if members is not None:
        entries, refs, n = membership_part(target, members, non_members, st,
                                           data_overrides or {}, log)
    res, passed, line = None, None, MEMBERSHIP_ONLY
    if st.one_run:
        res, passed, line = one_run_part(target, run_dir, claim, claimed, delta, st)
    record = exposure.read_canaries(run_dir)
    canaries = (exposure.canary_exposure(target, record, n_candidates=st.n_candidates,
                                         seed=st.seed) if record else None)
    report = {
        "kind": "privacy", "run": {"path": str(run_dir), "task": target.cfg.train.task,
                                   "dp": claim["dp"], "privacy": claim},
        "claimed_epsilon": claimed, "delta": delta,
        "empirical_epsilon": res["epsilon_lower_bound"] if res else None,
        "empirical_epsilon_source": "one_run" if res else None,
        "one_run": res, "membership_inference": "descriptive only (no epsilon bound)",
        "confidence": st.confidence, "passed": passed, "verdict": line, "n": n,
        "attacks": entries, "reference_models": refs, "canaries": canaries,
        "settings": {k: v for k, v in vars(st).items()},
        "inputs": input_hashes(run_dir, members, non_members), "versions": versions()}
    if out is not None:
        from .report import write_report
        report["_paths"] = {k: str(v) for k, v in
                            write_report(report, prepare_out_dir(out)).items()}
    return report


def input_hashes(run_dir: Path, members: str | Path | None,
                 non_members: str | Path | None) -> dict[str, Any]:
    out = ({"members_sha256": sha256_file(members), "non_members_sha256":
            sha256_file(non_members)} if members is not None else {})
    for name in ("model.safetensors", "config.json", "privacy.json", exposure.CANARIES_FILE):
        if (run_dir / name).is_file():
            out[f"{name}_sha256"] = sha256_file(run_dir / name)
    out["model_sha256"] = out.get("model.safetensors_sha256")  # the key every report shares
    return out
