"""The disparity entries of report.json: each group against the overall population and
against a reference group, every pair of groups, and the per-slice ranges derived from the
pairs. ``audit.run_audit`` calls these per slice and metric; ``comparisons.Pending`` then
gives every entry its simultaneous interval, flag and status.

Why every pair, and ranges derived from them: the between-groups range (fairlearn's
demographic parity / equalized odds difference, max - min over groups) used to take its
interval from the pair that is highest and lowest *in the data*. With many groups that pair
differs by chance, and its interval ignores the selection (a fair model with 24 groups was
flagged in every trial). Here every pair gets a studentized comparison in the family, and
the range's simultaneous interval follows from theirs: if every pair difference d_ij lies in
[lo_ij, hi_ij], then max |d_ij| lies in [max_ij L_ij, max_ij U_ij] with L = max(0, lo, -hi),
U = max(|lo|, |hi|). So the range is flagged exactly when some pair is.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .comparisons import Pending, Side, detectable, flag, judge, test_scale
from .simultaneous import percentile

OVERALL = "overall"
HIGHER_IS_WORSE = ("fpr", "fnr", "calibration_error", "perplexity")

Arrays = dict[str, np.ndarray]


def pooled_variance(reps: np.ndarray, n: int) -> dict[str, float]:
    """N Var of the overall metric's replicates, on both test scales (see
    ``comparisons.test_scale``): what a group of n rows has, divided by n, under parity."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        logs = np.where(reps > 0, np.log(np.where(reps > 0, reps, 1)), np.nan)
        return {"difference": float(n * np.nanvar(reps)), "ratio": float(n * np.nanvar(logs))}


def side(p: Arrays, r: Arrays, m: str, idx: np.ndarray, prop: bool) -> Side:
    """Groups ``idx`` of a slice's point values ``p`` ([G]) and replicates ``r`` ([B, G])."""
    if not prop:
        return Side(p[m][idx], r[m][:, idx], n=p["n"][idx])
    return Side(p[m][idx], r[m][:, idx], p[f"{m}:num"][idx], p[f"{m}:den"][idx],
                r[f"{m}:num"][:, idx], r[f"{m}:den"][:, idx], p["n"][idx])


def _values(kind: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return a - b if kind == "difference" else np.where(b != 0, a / np.where(b != 0, b, 1),
                                                           np.nan)


def _worse(m: str, a: float, b: float) -> bool:
    return bool(a > b) if m in HIGHER_IS_WORSE else bool(a < b)


def to_other(pend: Pending, base: dict[str, Any], groups: list[dict[str, Any]], m: str,
             prop: bool, a: Side, b: Side, nested: bool, eligible: np.ndarray,
             thresholds: dict[str, float | None], other_key: str,
             sigma2: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Entries of groups (``a``) against one other (``b``): overall or a reference group.
    ``groups[i]`` holds the per-group keys (group, label, n, small)."""
    out = []
    for kind in ("difference", "ratio"):
        theta, reps, floor = test_scale(kind, a, b, prop, nested, sigma2)
        values = _values(kind, a.value, b.value)
        ents = [{**base, "metric": m, "kind": kind, **g, "worse_off": _worse(m, av, bv),
                 "group_value": float(av), other_key: float(bv), "value": float(v),
                 "threshold": thresholds[kind]}
                for g, av, bv, v in zip(groups, a.value, b.value, values)]
        pend.add_block(ents, kind, theta, reps, floor, eligible, prop)
        out += ents
    return out


def pairs(pend: Pending, name: str, keys: list[tuple[str, ...]], cols: tuple[str, ...],
          p: Arrays, r: Arrays, m: str, metric: str, prop: bool, keep: np.ndarray,
          thresholds: dict[str, float | None],
          kinds: tuple[str, ...] = ("difference", "ratio"),
          sigma2: dict[str, float] | None = None
          ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every pair of kept groups (higher point value first) and the slice's range entries
    ({kind: entry}), whose marginal interval is that of the extreme pair (as before) and
    whose simultaneous interval is set by :func:`finish_ranges`."""
    kept = np.flatnonzero(keep & np.isfinite(p[m]))
    if len(kept) < 2:
        return [], {}
    i, j = np.triu_indices(len(kept), 1)
    gi, gj = kept[i], kept[j]
    first = p[m][gi] >= p[m][gj]
    hi, lo = np.where(first, gi, gj), np.where(first, gj, gi)
    a, b = side(p, r, m, hi, prop), side(p, r, m, lo, prop)
    label = ["*".join(k) for k in keys]
    out: list[dict[str, Any]] = []
    ranges: dict[str, dict[str, Any]] = {}
    top, bottom = kept[np.argmax(p[m][kept])], kept[np.argmin(p[m][kept])]
    for kind in kinds:
        theta, reps, floor = test_scale(kind, a, b, prop, sigma2=sigma2)
        values = _values(kind, a.value, b.value)
        ents = [{"slice": name, "metric": metric, "kind": kind, "reference": "between_groups",
                 "scope": "pair", "group": dict(zip(cols, keys[x])), "label": label[x],
                 "other_group": dict(zip(cols, keys[y])), "other_label": label[y],
                 "value": float(v), "threshold": thresholds[kind]}
                for x, y, v in zip(hi, lo, values)]
        pend.add_block(ents, kind, theta, reps, floor, np.ones(len(ents), bool), prop)
        out += ents
        x, y = (top, bottom) if kind == "difference" else (bottom, top)  # max - min; min / max
        rv, value = _values(kind, r[m][:, x], r[m][:, y]), _values(kind, p[m][x], p[m][y])
        ranges[kind] = {"slice": name, "metric": metric, "kind": kind,
                        "reference": "between_groups", "scope": "range",
                        "value": float(value), "ci": percentile(rv, pend.maxt.level).tolist(),
                        "threshold": thresholds[kind], "max_group": label[top],
                        "min_group": label[bottom], "_pairs": ents, "_reps": rv}
    return out, ranges


def range_interval(kind: str, cis: list[list[float]]) -> list[float]:
    """The interval of max |d| (difference) or min(q, 1/q) (ratio) over pairs, given an
    interval for each pair's d or q that holds jointly."""
    if not cis:
        return [np.nan, np.nan]
    lo, hi = np.array(cis, float).T
    if kind == "difference":
        low = np.fmax(0, np.fmax(lo, -hi))
        up = np.fmax(np.abs(lo), np.abs(hi))
        return [float(np.nanmax(low)), float(np.nanmax(up))]
    with np.errstate(all="ignore"):
        low = np.fmin(lo, 1 / hi)
        up = np.where(hi < 1, hi, np.where(lo > 1, 1 / lo, 1.0))
    return [float(np.nanmin(low)), float(np.nanmin(up))]


def finish_ranges(ranges: list[dict[str, Any]], simultaneous: bool) -> None:
    """Simultaneous intervals, flags and statuses of range entries (after the pairs')."""
    for e in ranges:
        e["ci_simultaneous"] = range_interval(e["kind"], [d["ci_simultaneous"]
                                                          for d in e.pop("_pairs")])
        _verdict(e, simultaneous)


def _verdict(e: dict[str, Any], simultaneous: bool) -> None:
    used = e["ci_simultaneous"] if simultaneous else e["ci"]
    e["flagged"] = flag(e["kind"], used, e["threshold"])
    e["status"] = judge(e["kind"], used, e["threshold"])
    e["detectable"] = detectable(e["kind"], used, e["threshold"]) \
        if e["status"] != "not_judged" else None


def equalized_odds(name: str, tpr: dict[str, dict[str, Any]], fpr: dict[str, dict[str, Any]],
                   level: float, t: dict[str, float | None], simultaneous: bool
                   ) -> list[dict[str, Any]]:
    """Equalized odds between groups, the worse of the TPR and FPR ranges, from the two
    ranges' entries (their intervals hold jointly, so the derived one does too)."""
    out = []
    for kind in ("difference", "ratio"):
        a, b = tpr[kind], fpr[kind]
        if kind == "difference":
            value, which = max(a["value"], b["value"]), (a if a["value"] >= b["value"] else b)
            rv = np.fmax(a["_reps"], b["_reps"])
            sim = [max(a["ci_simultaneous"][0], b["ci_simultaneous"][0]),
                   max(a["ci_simultaneous"][1], b["ci_simultaneous"][1])]
        else:
            value, which = min(a["value"], b["value"]), (a if a["value"] <= b["value"] else b)
            rv = np.fmin(a["_reps"], b["_reps"])
            sim = [min(a["ci_simultaneous"][0], b["ci_simultaneous"][0]),
                   min(a["ci_simultaneous"][1], b["ci_simultaneous"][1])]
        e = {"slice": name, "metric": "equalized_odds", "kind": kind,
             "reference": "between_groups", "scope": "range", "value": float(value),
             "ci": percentile(rv, level).tolist(), "ci_simultaneous": sim,
             "threshold": t[kind], "via": which["metric"], "max_group": which["max_group"],
             "min_group": which["min_group"]}
        _verdict(e, simultaneous)
        out.append(e)
    return out


STATUS_ORDER = ("flagged", "insufficient_data", "not_flagged", "within_tolerance")


def group_status(entry: dict[str, Any], ds: list[dict[str, Any]]) -> None:
    """A group's status from its own comparisons (to overall, to the reference): the first
    of flagged, insufficient_data, not_flagged, within_tolerance that any of them has;
    ``detectable_gap``: per metric, the largest smallest-detectable difference."""
    judged = [d for d in ds if d["status"] != "not_judged"]
    statuses = {d["status"] for d in judged}
    entry["status"] = next((s for s in STATUS_ORDER if s in statuses), "not_judged")
    gaps: dict[str, float] = {}
    for d in judged:
        if d["kind"] == "difference" and d["detectable"] is not None:
            gaps[d["metric"]] = max(gaps.get(d["metric"], 0.0), d["detectable"])
    entry["detectable_gap"] = gaps
    entry["insufficient_metrics"] = sorted({d["metric"] for d in judged
                                            if d["status"] == "insufficient_data"})
