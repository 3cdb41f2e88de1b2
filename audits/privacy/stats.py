"""Statistics of a membership-inference attack: ROC, AUC, TPR at low FPR and their intervals.

Descriptive only. An epsilon lower bound from members vs non-members (Clopper-Pearson over
rows) used to live here; it treated every row as an independent trial of the DP game, which
they are not (one shared model, rows sharing users, members chosen by a split), so its
confidence was not justified. The valid bound is the one-run audit (``one_run.py``).

Conventions: a higher score means "more likely a member"; the attack predicts "member" when
``score >= t``. The ROC points are the thresholds at every distinct score (ties move together,
so AUC is the Mann-Whitney statistic with ties counted half). TPR at FPR ``a`` is the highest TPR
among ROC points with FPR <= a (no interpolation, as in Carlini et al. 2022, "Membership
Inference Attacks From First Principles").

Intervals: the AUC and TPR-at-FPR intervals are percentile intervals of a Poisson bootstrap
(every example gets an independent Poisson(1) weight, resampling members and non-members
independently). All resamples share one sort of the scores, so 1,000 resamples of 20,000 rows
take about a second. The intervals also assume independent rows, so they describe the
variability of these rows, not a guarantee about the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FPR_LEVELS = (0.01, 0.001)


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
