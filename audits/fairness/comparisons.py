"""The comparisons of a fairness report, on their test scales, and their verdicts.

Every disparity compares a *subject* with an *other*: a group with the overall population
(the subject's rows are part of the other: ``nested``), a group with a reference group, or
one group with another (every pair). :func:`test_scale` puts one block of such comparisons
on the scale the max-t bootstrap studentizes (``simultaneous.py``): differences as they are,
ratios as log ratios. :class:`Pending` holds the entries until the family's critical value
is known, then gives each its simultaneous interval, flag and status.

Statuses (docs/design.md): ``flagged`` (the interval used for flagging lies entirely beyond
the tolerance), ``within_tolerance`` (it lies entirely within the tolerance band: the gap is
shown to be smaller than the tolerance), ``insufficient_data`` (not flagged, and the interval
is wider than the whole tolerance band, so at this n no estimate could show the gap to be
within tolerance), ``not_flagged`` (neither: the interval straddles an edge of the band; the
gap is not shown to exceed the tolerance), ``not_judged`` (no tolerance applies: a ratio
without a threshold, or a non-proportion metric of a small group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import math

import numpy as np

from .simultaneous import MaxT, marginal_z, percentile, prop_var, smoothed


@dataclass
class Side:
    """One side of a block of P comparisons: point values [P] and replicates [B, P]; for
    proportion metrics also the counts (num/den) of the point and of each replicate."""

    value: np.ndarray
    reps: np.ndarray
    num: np.ndarray | None = None
    den: np.ndarray | None = None
    rnum: np.ndarray | None = None
    rden: np.ndarray | None = None
    n: np.ndarray | None = None  # rows per group (pooled floors of other metrics)


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.where(x > 0, np.log(np.where(x > 0, x, 1)), np.nan)


def test_scale(kind: str, a: Side, b: Side, prop: bool, nested: bool = False,
               sigma2: dict[str, float] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(theta [P], replicates [B, P], se floor [P]) of ``a`` vs ``b`` on the test scale.

    Why floors: studentizing by the bootstrap se alone fails exactly where fair models get
    flagged: a group of 15 positives that were all found has TPR 1 and bootstrap se 0, and a
    rate that is far from its truth by chance comes with a se estimated at that wrong value.
    So each se is at least the largest of

    * an *unpooled* one from the Jeffreys-smoothed counts (proportions): a difference of
      independent groups has variance v_a + v_b; a group against the overall population that
      contains it, p_o = w p_a + (1 - w) p_rest, has (1 - w)^2 (v_a + v_rest); log ratios
      use the delta method on the smoothed proportions;
    * a *pooled* one, the se under parity (as in a score test): proportions with the pooled
      smoothed rate p, p (1 - p) (1/n_a + 1/n_b), or p (1 - p) (1 - w) / n_a against overall
      (log ratios: (1 - p) / p times the same); other metrics with the overall metric's
      bootstrap variance scaled to the group sizes, ``sigma2[kind]`` = N Var(overall) (the
      variance of a mean-like metric of n rows is about sigma2 / n).

    Each can only widen an interval, so coverage never depends on which one binds.
    """
    zero = np.zeros_like(np.asarray(a.value, float))
    with np.errstate(all="ignore"):
        if nested:
            wa = (a.den / b.den) if prop else (a.n / b.n)
        if prop:
            va, vb = prop_var(a.num, a.den), prop_var(b.num, b.den)
            pool = smoothed(b.num, b.den) if nested else smoothed(a.num + b.num, a.den + b.den)
            size = (1 - wa) / a.den if nested else 1 / a.den + 1 / b.den
            if nested:
                vr = np.nan_to_num(prop_var(b.num - a.num, b.den - a.den))
        elif sigma2 is not None and a.n is not None:
            size = (1 - wa) / a.n if nested else 1 / a.n + 1 / b.n
            pooled = np.sqrt(sigma2.get(kind, np.nan) * size)
        else:
            pooled = zero
        if kind == "difference":
            theta, reps = a.value - b.value, a.reps - b.reps
            if not prop:
                return theta, reps, np.nan_to_num(pooled)
            var = (1 - wa) ** 2 * (va + vr) if nested else va + vb
            return theta, reps, np.fmax(np.sqrt(var), np.sqrt(pool * (1 - pool) * size))
        if not prop:
            return (_log(a.value) - _log(b.value), _log(a.reps) - _log(b.reps),
                    np.nan_to_num(pooled))
        pa, pb = smoothed(a.num, a.den), smoothed(b.num, b.den)
        theta = _log(pa) - _log(pb)
        reps = _log(smoothed(a.rnum, a.rden)) - _log(smoothed(b.rnum, b.rden))
        if nested:
            var = (1 / pa - wa / pb) ** 2 * va + ((1 - wa) / pb) ** 2 * vr
        else:
            var = va / pa ** 2 + vb / pb ** 2
        return theta, reps, np.fmax(np.sqrt(var), np.sqrt((1 - pool) / pool * size))


def flag(kind: str, ci: list[float], t: float | None) -> bool:
    """Whole interval beyond the tolerance: outside [-t, t] (difference), [t, 1/t] (ratio)."""
    lo, hi = ci
    if t is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return False
    if kind == "difference":
        return bool(lo > t or hi < -t)
    return bool(hi < t or lo > 1 / t)


def judge(kind: str, ci: list[float], t: float | None, eligible: bool = True) -> str:
    """The status of one comparison (see the module docstring)."""
    lo, hi = ci
    if t is None or not eligible:
        return "not_judged"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "insufficient_data"
    if flag(kind, ci, t):
        return "flagged"
    if kind == "difference":
        if -t <= lo and hi <= t:
            return "within_tolerance"
        return "insufficient_data" if hi - lo > 2 * t else "not_flagged"
    if t <= lo and hi <= 1 / t:
        return "within_tolerance"
    return "insufficient_data" if lo <= 0 or hi / lo > 1 / t ** 2 else "not_flagged"


def detectable(kind: str, ci: list[float], t: float | None) -> float | None:
    """The smallest observed gap that an interval this wide would flag: tolerance + half
    the width (difference); for a ratio, the ratio below which it would be flagged."""
    lo, hi = ci
    if t is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    if kind == "difference":
        return float(t + (hi - lo) / 2)
    return float(t * np.sqrt(lo / hi)) if lo > 0 else 0.0


@dataclass
class Pending:
    """Entries whose simultaneous intervals wait for the family's critical value."""

    maxt: MaxT
    simultaneous: bool = True
    all_in_family: bool = False  # also comparisons without a tolerance (mitigation gaps)
    items: list[tuple[dict[str, Any], float, float, bool, bool]] = field(default_factory=list)

    def add_block(self, entries: list[dict[str, Any]], kind: str, theta: np.ndarray,
                  reps: np.ndarray, floor: np.ndarray, eligible: np.ndarray, prop: bool
                  ) -> None:
        """Marginal interval of each entry now: the percentile interval joined with
        theta +- z floor; family = the entries that can be flagged."""
        thresholds = np.array([e["threshold"] is not None or self.all_in_family
                               for e in entries], bool)
        family = eligible & thresholds
        se = self.maxt.add(theta, reps, floor, family, analytic=prop)
        lo_hi = percentile(reps, self.maxt.level)
        z = marginal_z(self.maxt.level)
        lo = np.fmin(lo_hi[0], theta - z * floor)
        hi = np.fmax(lo_hi[1], theta + z * floor)
        for j, e in enumerate(entries):
            e["ci"] = _back(kind, lo[j], hi[j], prop)
            self.items.append((e, float(theta[j]), float(se[j]), bool(eligible[j]), prop))

    def finish(self) -> float:
        """Simultaneous intervals (joined with the marginal), flags and statuses."""
        c = self.maxt.critical()
        for e, theta, se, eligible, prop in self.items:
            kind = e["kind"]
            lo, hi = _test(kind, e["ci"])
            if math.isfinite(theta) and math.isfinite(se):
                lo, hi = min(lo, theta - c * se), max(hi, theta + c * se)
            e["ci_simultaneous"] = _back(kind, lo, hi, prop)
            used = e["ci_simultaneous"] if self.simultaneous else e["ci"]
            t = e["threshold"]
            e["flagged"] = bool(eligible and flag(kind, used, t))
            e["status"] = judge(kind, used, t, eligible)
            e["detectable"] = detectable(kind, used, t) if e["status"] != "not_judged" else None
        return c


def _back(kind: str, lo: float, hi: float, prop: bool) -> list[float]:
    """Test scale -> report scale (NaN stays NaN: min/max with NaN keep the NaN side)."""
    if kind == "ratio":
        return [_exp(lo), _exp(hi)]
    if prop:
        lo, hi = max(lo, -1.0) if lo == lo else lo, min(hi, 1.0) if hi == hi else hi
    return [float(lo), float(hi)]


def _exp(x: float) -> float:
    if x != x:
        return math.nan
    return 0.0 if x == -math.inf else (math.inf if x > 700 else math.exp(x))


def _test(kind: str, ci: list[float]) -> tuple[float, float]:
    if kind == "ratio":
        lo, hi = ci
        return (math.log(lo) if lo > 0 else (-math.inf if lo == 0 else math.nan),
                math.log(hi) if hi > 0 else (-math.inf if hi == 0 else math.nan))
    return ci[0], ci[1]
