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


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.where(x > 0, np.log(np.where(x > 0, x, 1)), np.nan)


def test_scale(kind: str, a: Side, b: Side, prop: bool, nested: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(theta [P], replicates [B, P], se floor [P]) of ``a`` vs ``b`` on the test scale.

    Floors (proportions only; 0 otherwise) come from the Jeffreys-smoothed counts: a
    difference of independent groups has variance v_a + v_b; a group against the overall
    population that contains it, p_o = w p_a + (1 - w) p_rest, has (1 - w)^2 (v_a + v_rest);
    log ratios use the delta method on the smoothed proportions.
    """
    zero = np.zeros_like(np.asarray(a.value, float))
    if prop:
        va, vb = prop_var(a.num, a.den), prop_var(b.num, b.den)
        if nested:
            with np.errstate(all="ignore"):
                w = np.where(b.den > 0, a.den / np.where(b.den > 0, b.den, 1), np.nan)
            vr = np.nan_to_num(prop_var(b.num - a.num, b.den - a.den))
    if kind == "difference":
        theta, reps = a.value - b.value, a.reps - b.reps
        if not prop:
            return theta, reps, zero
        var = (1 - w) ** 2 * (va + vr) if nested else va + vb
        return theta, reps, np.sqrt(var)
    if not prop:
        with np.errstate(all="ignore"):
            return _log(a.value) - _log(b.value), _log(a.reps) - _log(b.reps), zero
    pa, pb = smoothed(a.num, a.den), smoothed(b.num, b.den)
    theta = _log(pa) - _log(pb)
    reps = _log(smoothed(a.rnum, a.rden)) - _log(smoothed(b.rnum, b.rden))
    if nested:
        with np.errstate(all="ignore"):
            var = (1 / pa - w / pb) ** 2 * va + ((1 - w) / pb) ** 2 * vr
    else:
        var = va / pa ** 2 + vb / pb ** 2
    return theta, reps, np.sqrt(var)


def flag(kind: str, ci: list[float], t: float | None) -> bool:
    """Whole interval beyond the tolerance: outside [-t, t] (difference), [t, 1/t] (ratio)."""
    lo, hi = ci
    if t is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return False
    if kind == "difference":
        return bool(lo > t or hi < -t)
    return bool(hi < t or lo > 1 / t)


def judge(kind: str, ci: list[float], t: float | None, eligible: bool = True) -> str:
    """The status of one comparison (see the module docstring)."""
    lo, hi = ci
    if t is None or not eligible:
        return "not_judged"
    if not (np.isfinite(lo) and np.isfinite(hi)):
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
    if t is None or not (np.isfinite(lo) and np.isfinite(hi)):
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
        se = self.maxt.add(theta, reps, floor, family)
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
            if np.isfinite(theta) and np.isfinite(se):
                lo, hi = np.fmin(lo, theta - c * se), np.fmax(hi, theta + c * se)
            e["ci_simultaneous"] = _back(kind, lo, hi, prop)
            used = e["ci_simultaneous"] if self.simultaneous else e["ci"]
            t = e["threshold"]
            e["flagged"] = bool(eligible and flag(kind, used, t))
            e["status"] = judge(kind, used, t, eligible)
            e["detectable"] = detectable(kind, used, t) if e["status"] != "not_judged" else None
        return c


def _back(kind: str, lo: float, hi: float, prop: bool) -> list[float]:
    if kind == "ratio":
        with np.errstate(all="ignore"):
            return [float(np.exp(lo)), float(np.exp(hi))]
    if prop:
        lo, hi = max(lo, -1.0), min(hi, 1.0)
    return [float(lo), float(hi)]


def _test(kind: str, ci: list[float]) -> tuple[float, float]:
    if kind == "ratio":
        with np.errstate(all="ignore"):
            return float(np.log(ci[0])) if ci[0] > 0 else -np.inf, float(np.log(ci[1]))
    return ci[0], ci[1]
