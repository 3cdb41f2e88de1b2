"""Simultaneous intervals over every comparison of a report: the max-t bootstrap.

Why: one fairness report makes hundreds of comparisons (each group against the overall
population or a reference group, every pair of groups, several metrics). A 95% interval per
comparison lets about 5% of the true-null comparisons look significant, so a fair model with
24 intersectional groups was flagged in every trial. Flags must rest on intervals that hold
*jointly*: with probability >= the stated level, every comparison's interval covers its true
value, so a fair model is flagged (anything at all) in at most 5% of audits.

Method: the studentized max-statistic bootstrap, single step (P. H. Westfall and S. S. Young,
"Resampling-Based Multiple Testing", Wiley 1993; J. P. Romano and M. Wolf, "Exact and
approximate stepdown methods for multiple hypothesis testing", JASA 100 (2005) 94-108). For
comparisons j with estimates theta_j, bootstrap replicates theta*_bj and standard errors se_j,

    T*_b = max_j |theta*_bj - theta_j| / se_j,   c = (level) quantile of T*_b,
    simultaneous interval_j = theta_j +- c se_j.

The maximum is taken inside each replicate, so c accounts for how correlated the
comparisons are (a group's difference and ratio, nested groups, pairs that share a group)
instead of assuming independence as Bonferroni does. Written here because fairlearn has no
multiple-comparison machinery; the replicates come from the count bootstrap (``bootstrap.py``),
resampled within groups (stratified), so group sizes are those of the table.

Assumptions: the bootstrap law of the studentized maximum approximates its sampling law
(large-sample; each group's rows are independent draws; the group sizes are taken as fixed).
Where it is weakest, at proportions near 0 or 1 and in tiny groups, the bootstrap standard
error collapses (a group whose 15 positives were all found has TPR 1 and se 0) or is
estimated at a value far from the truth, so every se is floored by analytic ones: from the
Jeffreys-smoothed proportions ((x + 1/2) / (n + 1)) and pooled under parity, as in a score
test (``comparisons.test_scale``); ratios are studentized on the log scale with the same
smoothing, so a rate of 0 gives a finite, wide interval instead of [0, 0]. Proportions are
studentized by that count-based se alone; other metrics by the spread of the even-numbered
replicates (floored), while the maxima come from the odd-numbered ones, so the replicates do
not normalize themselves by a spread they helped estimate. The critical value is the
conservative order statistic of the B/2 maxima.
``tests/test_fairness_simultaneous.py`` checks joint coverage by simulation, tiny groups and
rates near 0 and 1 included; ``benchmarks/bench_audit_calibration.py`` measures the share of
fair models flagged.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import norm


def smoothed(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Jeffreys-smoothed proportion (x + 1/2) / (n + 1); NaN where ``den`` is 0 or NaN."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    with np.errstate(all="ignore"):
        return np.where(den > 0, (num + 0.5) / (den + 1), np.nan)


def prop_var(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Variance of a proportion from its smoothed value: never 0, even at 0/n or n/n."""
    p = smoothed(num, den)
    with np.errstate(all="ignore"):
        return p * (1 - p) / np.asarray(den, float)


def percentile(reps: np.ndarray, level: float) -> np.ndarray:
    """Percentile interval along axis 0 ([2, ...]); NaN where no replicate is defined."""
    q = [(1 - level) / 2, (1 + level) / 2]
    reps = np.asarray(reps, float)
    if reps.ndim != 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanquantile(reps, q, axis=0)
    out = np.full((2, reps.shape[1]), np.nan)
    bad = np.isnan(reps).any(axis=0)
    if (~bad).any():  # vectorized; nanquantile works column by column
        out[:, ~bad] = np.quantile(reps[:, ~bad], q, axis=0)
    if bad.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[:, bad] = np.nanquantile(reps[:, bad], q, axis=0)
    return out


class MaxT:
    """Collects blocks of comparisons, then gives the critical value ``c`` of the family.

    ``add`` returns each comparison's standard error (bootstrap, floored) and accumulates,
    per replicate, the maximum studentized deviation over the comparisons that belong to the
    family (those that can be flagged). ``critical`` is its ``level`` quantile (the
    conservative order statistic), never below the marginal normal quantile.
    """

    def __init__(self, level: float, n_boot: int):
        self.level = level
        self.tmax = np.full(n_boot // 2, -np.inf)  # the odd replicates; see ``add``
        self.size = 0

    def add(self, theta: np.ndarray, reps: np.ndarray, floor: np.ndarray | None = None,
            family: np.ndarray | None = None, analytic: bool = False) -> np.ndarray:
        """``analytic``: ``floor`` is the standard error itself (proportions: from counts),
        the replicates' spread is not used for it. Why both this and the even/odd split: a
        se estimated from B replicates carries Monte-Carlo noise (about 1/sqrt(2B)
        relative), which the observed statistic feels and replicates normalized by their own
        spread do not; over thousands of comparisons that made fair models flag slightly
        more often than the level allows (6.6% at 48 groups, tolerance 0, n_boot 200)."""
        theta = np.asarray(theta, float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            # the bootstrap se from the even replicates, the maxima from the odd ones: a
            # replicate normalized by a spread it helped estimate has thinner tails than
            # the observed statistic, whose se it did not shape
            even = reps[0::2]
            se = np.nanstd(even, axis=0, ddof=1) if len(even) > 1 else np.zeros_like(theta)
        se = np.where(np.isfinite(se), se, np.nan)
        if floor is not None:
            floor = np.asarray(floor, float)
            use = analytic & np.isfinite(floor) & (floor > 0)
            se = np.where(use, floor, np.fmax(se, floor))
        fam = np.isfinite(theta) & (se > 0)
        if family is not None:
            fam &= np.asarray(family, bool)
        if fam.any():
            odd = reps[1::2][: len(self.tmax)]
            with np.errstate(all="ignore"):
                t = np.abs(odd[:, fam] - theta[fam]) / se[fam]
            t = np.where(np.isfinite(t), t, -np.inf)
            self.tmax = np.maximum(self.tmax, t.max(axis=1))
            self.size += int(fam.sum())
        return se

    def critical(self) -> float:
        z = float(norm.ppf((1 + self.level) / 2))
        if self.size == 0:
            return z
        # the ceil((B + 1) level)-th smallest maximum: a new draw falls below it with
        # probability >= level (linear interpolation would give (B - 1) level / (B + 1))
        k = min(len(self.tmax), int(np.ceil((len(self.tmax) + 1) * self.level)))
        return max(z, float(np.sort(self.tmax)[k - 1]))


def marginal_z(level: float) -> float:
    return float(norm.ppf((1 + level) / 2))
