"""Intervals and verdicts of the LM bias audit, with the error controlled across the report.

Why not one interval per gap: the report makes many comparisons (every pair of groups of
every attribute, for the likelihood preference, the positivity and each generation scorer).
Flagging each one at 95% would flag *something* in most reports of a fair model; and picking
the highest and lowest group from the data, then bootstrapping that fixed pair, is biased
towards large gaps (docs/platform-notes.md). So every pair of groups is a comparison, and the
flag rests on intervals that hold *simultaneously* over all of them.

Method: single-step max-|t| bootstrap-t (Westfall & Young 1993, *Resampling-Based Multiple
Testing*; Romano & Wolf 2005, JASA 100:94-108). One bootstrap replicate resamples every
source of the report jointly (templates for the counterfactual probe, continuations within
each group for the generation probe), so the replicates carry the dependence between
comparisons. Each replicate is studentized by its *own* standard error,
``t_bk = |d*_bk - d_k| / se*_bk`` (bootstrap-t: with 12-36 templates, studentizing by one
fixed bootstrap SE flagged a fair model in 7-20% of simulated reports at 95%; this keeps it
under 5%). The critical value ``c`` is the ``ci`` quantile of ``max_k t_bk``, and the
simultaneous interval is ``d_k +- c se_k``; the marginal interval uses the ``ci`` quantile of
``t_bk`` for that comparison alone. Assumes the resampled units (templates; continuations of a
group) are independent draws. ``tests/test_fairness_lm_bias.py`` checks by simulation that a
report with no true gap flags nothing in at least 95% of trials (up to Monte-Carlo error).

Verdicts (tolerance ``tau``, simultaneous interval ``[lo, hi]`` of a signed gap):

* ``flagged``: the whole interval lies beyond the tolerance (``lo > tau`` or ``hi < -tau``);
* ``insufficient_data``: not flagged, and the interval is wider than ``+-tau`` (half-width
  ``> tau``): even a gap of zero could not be told apart from one beyond the tolerance;
* ``not_flagged``: otherwise. Its wording is "not shown to exceed the tolerance", never
  "within": an unflagged gap is an absence of evidence, not a proof of fairness.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Callable

import numpy as np

METHOD = ("simultaneous max-|t| bootstrap-t intervals (single-step; Westfall & Young 1993, "
          "Romano & Wolf 2005) over every pair of groups of every measure in the report, "
          "resampled jointly")
STATUSES = ("flagged", "insufficient_data", "not_flagged")


def quantiles(reps: np.ndarray, ci: float) -> np.ndarray:
    """Percentile interval along axis 0 ([2, ...]); NaN where no replicate is defined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(reps, [(1 - ci) / 2, (1 + ci) / 2], axis=0)


PairStats = tuple[float, float, np.ndarray, np.ndarray]  # est, se, reps [B], se_reps [B]


def _mean_se(w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and standard error of ``x`` per row of ``w`` (rows: counts of each unit
    in a resample). ``se = sqrt(s^2 / n)`` with the unbiased ``s^2``; NaN when ``n < 2``."""
    n = w.sum(-1)
    with np.errstate(all="ignore"):
        m = (w @ x) / n
        v = np.maximum((w @ (x * x)) / n - m * m, 0.0) / (n - 1)
        return m, np.where(n >= 2, np.sqrt(v), np.nan)


def _row_se(rows: np.ndarray) -> np.ndarray:
    """Standard error of the mean of each row; NaN for rows of fewer than 2 values."""
    n = rows.shape[1]
    if n < 2:
        return np.full(len(rows), np.nan)
    return rows.std(1, ddof=1) / np.sqrt(n)


@dataclass
class Measure:
    """One per-group quantity whose pairwise gaps the report judges: ``pair(i, j)`` gives the
    gap ``group i - group j``, its standard error, and both over the bootstrap replicates."""

    names: list[str]
    value: np.ndarray  # [G], for display
    group_reps: np.ndarray  # [B, G] replicates of ``value`` (per-group marginal intervals)
    pair: Callable[[int, int], PairStats]
    tolerance: float
    summary: dict[str, Any] = field(default_factory=dict)  # filled by ``judge``
    where: dict[str, Any] | None = None  # the report dict that receives ``summary`` ...
    key: str = ""  # ... under this key


def template_measures(per_t: np.ndarray, sentiment: np.ndarray, names: list[str],
                      weights: np.ndarray, tolerance: float) -> dict[str, Measure]:
    """Likelihood preference (mean over templates) and, with both labels, positivity (mean
    over positive templates minus mean over negative ones) per group. ``per_t``: [T, G] centred
    preferences; ``weights``: [B, T] multinomial counts of each template in a resample."""
    T = len(per_t)
    ones = np.ones((1, T))
    pos, neg = sentiment == "positive", sentiment == "negative"

    def likelihood(i: int, j: int) -> PairStats:
        x = per_t[:, i] - per_t[:, j]
        (m,), (se,) = _mean_se(ones, x)
        mb, seb = _mean_se(weights, x)
        return float(m), float(se), mb, seb

    def positivity(i: int, j: int) -> PairStats:
        x = per_t[:, i] - per_t[:, j]
        (mp,), (sp,) = _mean_se(ones * pos, x)
        (mn,), (sn,) = _mean_se(ones * neg, x)
        mpb, spb = _mean_se(weights * pos, x)
        mnb, snb = _mean_se(weights * neg, x)
        return float(mp - mn), float(np.hypot(sp, sn)), mpb - mnb, np.hypot(spb, snb)

    wn = weights / weights.sum(1, keepdims=True)
    out = {"likelihood_gap": Measure(names, per_t.mean(0), wn @ per_t, likelihood, tolerance)}
    if pos.any() and neg.any():
        with np.errstate(all="ignore"):
            reps = ((weights * pos) @ per_t / (weights * pos).sum(1, keepdims=True)
                    - (weights * neg) @ per_t / (weights * neg).sum(1, keepdims=True))
        out["sentiment_gap"] = Measure(names, per_t[pos].mean(0) - per_t[neg].mean(0), reps,
                                       positivity, tolerance)
    return out


def group_measure(x: np.ndarray, index: list[np.ndarray], names: list[str], n_boot: int,
                  rng: np.random.Generator, tolerance: float) -> Measure:
    """Per-group mean of ``x`` (rows ``index[g]``), resampled within each group."""
    stats = []
    for idx in index:
        v = x[idx]
        rs = v[rng.integers(0, len(v), (n_boot, len(v)))]  # [B, n]
        stats.append((float(v.mean()), float(_row_se(v[None])[0]), rs.mean(1), _row_se(rs)))

    def pair(i: int, j: int) -> PairStats:
        a, b = stats[i], stats[j]
        return a[0] - b[0], float(np.hypot(a[1], b[1])), a[2] - b[2], np.hypot(a[3], b[3])

    return Measure(names, np.array([s[0] for s in stats]), np.stack([s[2] for s in stats], 1),
                   pair, tolerance)


def status(lo: float, hi: float, tolerance: float) -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "insufficient_data"
    if lo > tolerance or hi < -tolerance:
        return "flagged"
    return "insufficient_data" if (hi - lo) / 2 > tolerance else "not_flagged"


def _t(reps: np.ndarray, est: float, se_reps: np.ndarray) -> np.ndarray:
    """|t| of each replicate; a replicate whose own standard error is 0 or undefined counts
    as extreme (inf) unless it equals the estimate: the conservative reading."""
    dev = np.abs(reps - est)
    with np.errstate(all="ignore"):
        t = dev / se_reps
    t[~np.isfinite(t)] = np.inf
    t[dev == 0] = 0.0
    return t


def judge(measures: list[Measure], ci: float) -> dict[str, Any]:
    """Fill each measure's ``summary`` (every pair of groups with its marginal and simultaneous
    interval and verdict; the headline is the largest gap) and return the error-control record.
    """
    pairs = [(m, i, j) for m in measures for i, j in combinations(range(len(m.names)), 2)]
    stats = [m.pair(i, j) for m, i, j in pairs]
    ok = [k for k, (est, se, _, _) in enumerate(stats) if np.isfinite(est) and np.isfinite(se)]
    t = np.stack([_t(stats[k][2], stats[k][0], stats[k][3]) for k in ok], axis=1) \
        if ok else np.zeros((1, 0))
    # order statistics ("higher"): no interpolation, so infinite replicates stay infinite
    crit = float(np.quantile(t.max(1), ci, method="higher")) if ok else float("nan")
    marginal = np.quantile(t, ci, axis=0, method="higher") if ok else np.zeros(0)
    rows: dict[int, list[dict[str, Any]]] = {}
    for k, (m, i, j) in enumerate(pairs):
        est, se = stats[k][0], stats[k][1]
        if k in ok:
            half_m, half_s = marginal[ok.index(k)] * se, crit * se
            if se == 0:
                half_m = half_s = 0.0
        else:
            half_m = half_s = float("nan")
        lo, hi = est - half_s, est + half_s
        a, b, sign = (i, j, 1) if est >= 0 else (j, i, -1)  # higher group minus lower
        rows.setdefault(id(m), []).append({
            "higher": m.names[a], "lower": m.names[b], "value": float(abs(est)),
            "ci": sorted([float(sign * (est - half_m)), float(sign * (est + half_m))]),
            "ci_simultaneous": sorted([float(sign * lo), float(sign * hi)]),
            "status": status(float(lo), float(hi), m.tolerance),
            "detectable_gap": float(m.tolerance + half_s)})
    for m in measures:
        mine = sorted(rows.get(id(m), []), key=lambda r: -r["value"])
        head = mine[0]
        worst = next((s for s in STATUSES if any(r["status"] == s for r in mine)), "not_flagged")
        m.summary = {"value": head["value"], "max_group": head["higher"],
                     "min_group": head["lower"], "ci": head["ci"],
                     "ci_simultaneous": head["ci_simultaneous"], "threshold": m.tolerance,
                     "flagged": worst == "flagged", "status": worst,
                     "detectable_gap": head["detectable_gap"], "pairs": mine}
    return {"method": METHOD, "level": ci, "comparisons": len(pairs),
            "critical_value": crit if np.isfinite(crit) else None}
