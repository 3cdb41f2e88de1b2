"""Statistics of a membership-inference attack: ROC, AUC, TPR at low FPR, their intervals, and
an honest empirical lower bound on epsilon.

Conventions: a higher score means "more likely a member"; the attack predicts "member" when
``score >= t``. The ROC points are the thresholds at every distinct score (ties move together,
so AUC is the Mann-Whitney statistic with ties counted half). TPR at FPR ``a`` is the highest TPR
among ROC points with FPR <= a (no interpolation, as in Carlini et al. 2022, "Membership
Inference Attacks From First Principles").

Intervals: the AUC and TPR-at-FPR intervals are percentile intervals of a Poisson bootstrap
(every example gets an independent Poisson(1) weight, resampling members and non-members
independently). All resamples share one sort of the scores, so 1,000 resamples of 20,000 rows
take about a second. The epsilon bound uses exact Clopper-Pearson intervals instead, because a
bootstrap is unreliable exactly where the bound lives: a handful of false positives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import betaincinv

FPR_LEVELS = (0.01, 0.001)


def clopper_pearson(k: np.ndarray | int, n: np.ndarray | int,
                    confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided binomial interval for ``k`` successes in ``n`` trials (vectorized).

    Each end holds with probability >= 1 - (1 - confidence) / 2, so a lower end of one
    proportion and an upper end of another hold together with probability >= ``confidence``
    (union bound): what the epsilon bound below needs.
    """
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    a = (1.0 - confidence) / 2.0
    lo = np.where(k > 0, betaincinv(np.maximum(k, 1e-300), n - k + 1, a), 0.0)
    hi = np.where(k < n, betaincinv(k + 1, np.maximum(n - k, 1e-300), 1 - a), 1.0)
    return lo, hi


@dataclass
class Sorted:
    """Scores sorted once (descending) and cut into groups of tied scores."""

    order: np.ndarray  # [n] indices, highest score first
    starts: np.ndarray  # [G] first position of each tie group in the sorted order
    thresholds: np.ndarray  # [G] the score of each group
    member: np.ndarray  # [n] bool, in sorted order


def sort_scores(scores: np.ndarray, member: np.ndarray) -> Sorted:
    scores = np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return Sorted(order, starts, s[starts], np.asarray(member, dtype=bool)[order])


def roc_points(st: Sorted, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR), each [B, G + 1] from (0, 0) to (1, 1), for ``weights`` [B, n] (rows of
    per-example weights in the original order; None: one row of ones)."""
    n = len(st.order)
    w = np.ones((1, n)) if weights is None else np.asarray(weights, dtype=float)[:, st.order]
    pos = np.add.reduceat(w * st.member, st.starts, axis=1)  # [B, G]
    neg = np.add.reduceat(w * ~st.member, st.starts, axis=1)
    zero = np.zeros((w.shape[0], 1))
    tp = np.concatenate([zero, np.cumsum(pos, axis=1)], axis=1)
    fp = np.concatenate([zero, np.cumsum(neg, axis=1)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return fp / fp[:, -1:], tp / tp[:, -1:]


def auc_of(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    """Trapezoid area under each row's ROC ([B]); equals Mann-Whitney U / (n_pos n_neg)."""
    return np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2.0, axis=1)


def tpr_at(fpr: np.ndarray, tpr: np.ndarray, level: float) -> np.ndarray:
    """Highest TPR among ROC points with FPR <= ``level`` ([B])."""
    return np.max(np.where(fpr <= level + 1e-12, tpr, 0.0), axis=1)


def roc_summary(scores: np.ndarray, member: np.ndarray, *, n_boot: int = 1000,
                confidence: float = 0.95, seed: int = 0,
                levels: tuple[float, ...] = FPR_LEVELS) -> dict:
    """AUC and TPR at each FPR level, each ``{"value", "ci"}``, plus the ROC curve."""
    st = sort_scores(scores, member)
    fpr, tpr = roc_points(st)
    out = {"auc": {"value": float(auc_of(fpr, tpr)[0])},
           "tpr_at_fpr": {str(a): {"value": float(tpr_at(fpr, tpr, a)[0])} for a in levels},
           "roc": {"fpr": fpr[0], "tpr": tpr[0]}}
    rng = np.random.default_rng(seed)
    aucs, tprs = [], {a: [] for a in levels}
    for start in range(0, n_boot, 100):  # chunks bound the memory: [100, n] weights
        w = rng.poisson(1.0, size=(min(100, n_boot - start), len(st.order)))
        bf, bt = roc_points(st, w)
        aucs.append(auc_of(bf, bt))
        for a in levels:
            tprs[a].append(tpr_at(bf, bt, a))
    q = [(1 - confidence) / 2, 1 - (1 - confidence) / 2]
    if n_boot:
        out["auc"]["ci"] = _quantiles(np.concatenate(aucs), q)
        for a in levels:
            out["tpr_at_fpr"][str(a)]["ci"] = _quantiles(np.concatenate(tprs[a]), q)
    return out


def _quantiles(x: np.ndarray, q: list[float]) -> list[float]:
    x = x[np.isfinite(x)]
    return [float(v) for v in np.quantile(x, q)] if len(x) else [math.nan, math.nan]


# ---- the empirical epsilon lower bound --------------------------------------------------
def epsilon_bounds(tp: np.ndarray, n_pos: int, fp: np.ndarray, n_neg: int, delta: float,
                   confidence: float) -> tuple[np.ndarray, dict]:
    """Lower bounds on epsilon from attack counts at one or more thresholds (vectorized).

    An (epsilon, delta)-DP training algorithm limits every membership test (Kairouz et al.
    2015; the audits of Jagielski et al. 2020 and Nasr et al. 2021): with FPR a and
    FNR b = 1 - TPR,  a + e^eps b >= 1 - delta  and  b + e^eps a >= 1 - delta, so

        eps >= log((TPR - delta) / FPR)   and   eps >= log((1 - FPR - delta) / (1 - TPR)).

    The rates are estimates, so each side uses its pessimistic Clopper-Pearson end: TPR's
    lower end and FPR's upper end in *both* expressions (the numerator small, the
    denominator large). Both ends hold together with probability >= ``confidence``.
    """
    tpr_lo, _ = clopper_pearson(tp, n_pos, confidence)
    _, fpr_hi = clopper_pearson(fp, n_neg, confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.where((tpr_lo > delta) & (fpr_hi > 0),
                      np.log(np.maximum(tpr_lo - delta, 1e-300) / fpr_hi), 0.0)
        e2 = np.where((1 - fpr_hi - delta > 0) & (tpr_lo < 1),
                      np.log(np.maximum(1 - fpr_hi - delta, 1e-300) / (1 - tpr_lo)), 0.0)
    eps = np.maximum(np.maximum(e1, e2), 0.0)
    return eps, {"tpr_lo": tpr_lo, "fpr_hi": fpr_hi, "which": np.where(e1 >= e2, 1, 2)}


def _counts_at(scores: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray, Sorted]:
    st = sort_scores(scores, member)
    tp = np.cumsum(np.add.reduceat(st.member.astype(float), st.starts))
    fp = np.cumsum(np.add.reduceat((~st.member).astype(float), st.starts))
    return tp, fp, st


def empirical_epsilon(scores: np.ndarray, member: np.ndarray, *, delta: float,
                      confidence: float = 0.95, seed: int = 0) -> dict:
    """An honest lower bound on epsilon from one attack's scores.

    Picking the best of many thresholds on the same data would overstate the bound (the
    maximum of many noisy estimates). So members and non-members are each split at random
    into halves: the threshold that maximizes the bound on the first half is chosen, and the
    bound is computed once, at that threshold, on the second half. The result holds with
    probability >= ``confidence`` if the members were drawn at random from the same
    population as the non-members (the DP game); a distribution shift between the two files
    shows up as leakage that DP does not promise to hide.
    """
    scores, member = np.asarray(scores, dtype=float), np.asarray(member, dtype=bool)
    rng = np.random.default_rng([seed, 0xE95])
    half = np.zeros(len(scores), dtype=bool)
    for grp in (np.flatnonzero(member), np.flatnonzero(~member)):
        half[rng.permutation(grp)[: len(grp) // 2]] = True
    tp, fp, st = _counts_at(scores[half], member[half])
    eps_sel, _ = epsilon_bounds(tp, int(member[half].sum()), fp, int((~member[half]).sum()),
                                delta, confidence)
    t = float(st.thresholds[int(np.argmax(eps_sel))])
    s2, m2 = scores[~half], member[~half]
    n_pos, n_neg = int(m2.sum()), int((~m2).sum())
    tp2, fp2 = int(((s2 >= t) & m2).sum()), int(((s2 >= t) & ~m2).sum())
    eps, info = epsilon_bounds(np.array([tp2]), n_pos, np.array([fp2]), n_neg, delta,
                               confidence)
    return {"value": float(eps[0]), "confidence": confidence, "delta": delta,
            "threshold": t, "selected_on_first_half": float(np.max(eps_sel)),
            "tpr": tp2 / max(n_pos, 1), "fpr": fp2 / max(n_neg, 1),
            "tpr_lo": float(info["tpr_lo"][0]), "fpr_hi": float(info["fpr_hi"][0]),
            "n_members": n_pos, "n_non_members": n_neg,
            "bound": ("log((TPR_lo - delta) / FPR_hi)" if info["which"][0] == 1
                      else "log((1 - FPR_hi - delta) / (1 - TPR_lo))")}
