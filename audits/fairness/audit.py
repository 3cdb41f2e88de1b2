"""The fairness audit: per-group metrics (fairlearn MetricFrame), bootstrap intervals and
disparities with thresholds, as the report.json of docs/design.md.

Slices: every attribute alone and every intersection of attributes (all subsets for up to
three attributes; beyond that each attribute and the full intersection).

Disparities, each with a bootstrap interval from the same resamples as the group values:

* ``reference: "overall"``: each group against the whole table, ``difference`` (group -
  overall) and ``ratio`` (group / overall);
* ``reference: "between_groups"``: the range over a slice's groups, ``difference``
  (max - min) and ``ratio`` (min / max), including demographic parity (selection rates) and
  equalized odds (the worse of the TPR and FPR ranges) for binary tasks. The interval is that
  of the difference (ratio) between the two groups that are highest and lowest in the data,
  from the same resamples. Why not the percentile interval of the resampled max - min: the
  maximum over many noisy groups is biased upward, so that interval can exclude the point
  value itself; on the bias-free corpus it flagged demographic parity (0.05, [0.11, 0.29]).

Flagging: a disparity is flagged only when its whole interval lies beyond the tolerance:
a difference whose interval lies outside ``[-t, t]``, a ratio whose interval lies outside
``[r, 1/r]``. Defaults (:class:`Thresholds`): difference tolerance 0.1 for every
classification metric; ratio threshold 0.8 (the four-fifths rule) for selection rates,
demographic parity and perplexity; other ratios are reported but not flagged.

Proportion metrics (accuracy, selection rate, TPR, FPR, FNR): a percentile bootstrap
collapses at 0 and 1 (a group whose positives were all found has the interval [1, 1]) and
understates the uncertainty of tiny groups (a group of one), so their intervals, and those of
their disparities to overall, are the union of the bootstrap interval and the Jeffreys
interval. FNR is 1 - TPR, so its disparities would repeat TPR's and are not listed.

Small groups (``n < min_group_size``, default 30) are kept and marked ``"small": true``; their
metrics that are not proportions are never flagged, and the between-groups ranges are taken
over the groups that are not small (a group of three makes any range meaningless).

``worse_off`` on a disparity to overall says whether the group is on the bad side of the
metric: lower accuracy, TPR, selection rate (taking the positive label as the favourable
outcome), higher FPR, calibration error or perplexity.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame
from scipy.stats import beta

from .bootstrap import Engine
from .metrics import metric_defs, metric_functions, sample_param_names
from .table import PredTable

OVERALL = "overall"
HIGHER_IS_WORSE = ("fpr", "fnr", "calibration_error", "perplexity")
NO_DISPARITY = ("fnr",)


@dataclass
class Thresholds:
    """Tolerances for flagging; ``overrides[(metric, kind)] = None`` disables one."""

    difference: float = 0.1
    ratio: float = 0.8
    overrides: dict[tuple[str, str], float | None] = field(default_factory=dict)

    def get(self, metric: str, kind: str) -> float | None:
        if (metric, kind) in self.overrides:
            return self.overrides[(metric, kind)]
        if kind == "ratio":
            ratio_metrics = metric.startswith("selection_rate") or metric in (
                "perplexity", "demographic_parity")
            return self.ratio if ratio_metrics else None
        return None if metric == "perplexity" else self.difference


@dataclass
class AuditSettings:
    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0
    min_group_size: int = 30
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass
class Slices:
    """Cells (finest intersections) and, per slice, the group of each cell."""

    names: list[str]
    cols: dict[str, tuple[str, ...]]
    cell: np.ndarray  # [N] cell of each row
    groups: dict[str, list[tuple[str, ...]]]  # slice -> group keys in order
    of_cell: dict[str, tuple[np.ndarray, int]]  # slice -> (group of each cell, n groups)


def make_slices(df: pd.DataFrame, sensitive: list[str]) -> Slices:
    k = len(sensitive)
    sizes = range(1, k + 1) if k <= 3 else [1, k]
    combos = [c for r in sizes for c in itertools.combinations(sensitive, r)]
    grouped = df.groupby(sensitive, sort=True)
    cell = grouped.ngroup().to_numpy()
    cells = grouped.size().index.to_frame(index=False)  # row i = the values of cell i
    names, cols, groups, of_cell = [], {}, {}, {}
    for c in combos:
        name = "*".join(c)
        keys = sorted({tuple(r) for r in cells[list(c)].itertuples(index=False)})
        index = {key: i for i, key in enumerate(keys)}
        names.append(name)
        cols[name], groups[name] = c, keys
        of_cell[name] = (np.array([index[tuple(r)] for r in cells[list(c)].itertuples(
            index=False)]), len(keys))
    of_cell[OVERALL] = (np.zeros(len(cells), np.int64), 1)
    return Slices(names, cols, cell, groups, of_cell)


def metricframe_values(pt: PredTable, cols: tuple[str, ...]
                       ) -> tuple[dict[tuple[str, ...], dict[str, float]], dict[str, float]]:
    """fairlearn's MetricFrame over one slice: ({group key: {metric: value}}, overall)."""
    funcs = metric_functions(pt.task)
    params = {p: pt.df[p].to_numpy(float) for p in sample_param_names(pt.task)}
    # only the metrics that read scores / NLL get them: fairlearn 0.15 converts every
    # argument element by element (np.stack), which dominates its cost on large tables
    needs = {m: params for m in funcs if m in ("calibration_error", "perplexity")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mf = MetricFrame(metrics=funcs, y_true=pt.df["y_true"].to_numpy(str),
                         y_pred=pt.df["y_pred"].to_numpy(str),
                         sensitive_features=pt.df[list(cols)],
                         sample_params=needs or None)
    keys = [k if isinstance(k, tuple) else (k,) for k in mf.by_group.index]
    by = {tuple(map(str, k)): row for k, row in zip(keys, mf.by_group.to_dict("records"))}
    return by, {m: float(v) for m, v in mf.overall.items()}


def quantiles(reps: np.ndarray, ci: float) -> np.ndarray:
    """Percentile interval along axis 0 ([2, ...]); NaN where no replicate is defined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(reps, [(1 - ci) / 2, (1 + ci) / 2], axis=0)


def jeffreys(num: float, den: float, ci: float) -> tuple[float, float]:
    if not den > 0:
        return (np.nan, np.nan)
    a = (1 - ci) / 2
    lo = 0.0 if num == 0 else float(beta.ppf(a, num + 0.5, den - num + 0.5))
    hi = 1.0 if num == den else float(beta.ppf(1 - a, num + 0.5, den - num + 0.5))
    return lo, hi


def flag(kind: str, ci: list[float], t: float | None, between: bool = False) -> bool:
    lo, hi = ci
    if t is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return False
    if kind == "difference":
        return bool(lo > t or (not between and hi < -t))
    return bool(hi < t or (not between and lo > 1 / t))


def _union(a: list[float], b: tuple[float, float]) -> list[float]:
    if not all(np.isfinite(b)):
        return a
    return [float(np.nanmin([a[0], b[0]])), float(np.nanmax([a[1], b[1]]))]


def group_label(key: tuple[str, ...]) -> str:
    return "*".join(key)


def _pair(pv: np.ndarray, rv: np.ndarray, keep: np.ndarray
          ) -> tuple[int, int, float, float, np.ndarray, np.ndarray] | None:
    """The highest and lowest kept group of the point values, their difference and ratio,
    and the same for that fixed pair in every replicate ([B])."""
    masked = np.where(keep, pv, np.nan)
    if np.isfinite(masked).sum() < 2:
        return None
    hi, lo = int(np.nanargmax(masked)), int(np.nanargmin(masked))
    with np.errstate(all="ignore"):
        q = pv[lo] / pv[hi] if pv[hi] > 0 else np.nan
        rq = np.where(rv[:, hi] > 0, rv[:, lo] / np.where(rv[:, hi] > 0, rv[:, hi], 1), np.nan)
    return hi, lo, float(pv[hi] - pv[lo]), float(q), rv[:, hi] - rv[:, lo], rq


def run_audit(pt: PredTable, settings: AuditSettings) -> dict[str, Any]:
    """Everything report.json holds except ``inputs``/``versions`` (see ``report.py``)."""
    task, st = pt.task, settings
    metrics = metric_defs(task)
    names = [m.name for m in metrics]
    props = {m.name for m in metrics if m.proportion is not None}
    sl = make_slices(pt.df, pt.sensitive)
    code, cont = pt.encoded()
    engine = Engine(task, metrics, sl.cell, sl.of_cell, code, cont)
    point, reps = engine.point(), engine.bootstrap(st.n_boot, st.seed)
    by_group, disparities = [], []
    ov_point = {m: float(point[OVERALL][0][m][0]) for m in names}
    ov_ci = {m: quantiles(reps[OVERALL][0][m][:, 0], st.ci).tolist() for m in names}
    for name in sl.names:
        by, overall = metricframe_values(pt, sl.cols[name])
        _check_agreement(by, overall, point[name][0], point[OVERALL][0], sl.groups[name], names)
        p, r = point[name][0], reps[name][0]
        n = p["n"].astype(int)
        small = n < st.min_group_size
        for gi, key in enumerate(sl.groups[name]):
            entry = {"slice": name, "group": dict(zip(sl.cols[name], key)),
                     "label": group_label(key), "n": int(n[gi]), "small": bool(small[gi]),
                     "metrics": {}}
            for m in names:
                value = float(by[key][m])
                ci = quantiles(r[m][:, gi], st.ci).tolist()
                jl = jeffreys(p[f"{m}:num"][gi], p[f"{m}:den"][gi], st.ci) if m in props else (
                    np.nan, np.nan)
                if m in props:
                    ci = _union(ci, jl)
                entry["metrics"][m] = {"value": value, "ci": ci}
                if m in NO_DISPARITY:
                    continue
                disparities += _to_overall(name, entry, m, value, r[m][:, gi],
                                           reps[OVERALL][0][m][:, 0], ov_point[m], jl,
                                           bool(small[gi]), m in props, st)
            by_group.append(entry)
        disparities += _between(name, sl.groups[name], p, r, ~small, task.kind, names, st)
    return {"task": task.kind, "labels": list(task.labels), "pos_label": task.pos_label,
            "sensitive": pt.sensitive, "slices": sl.names, "metrics": names,
            "by_group": by_group, "disparities": disparities,
            "overall": {"n": len(pt.df), "metrics": {m: {"value": ov_point[m], "ci": ov_ci[m]}
                                                     for m in names}},
            "settings": {"n_boot": st.n_boot, "ci": st.ci, "seed": st.seed,
                         "min_group_size": st.min_group_size, "n_bins": task.n_bins,
                         "bootstrap": "multinomial over group-cell counts (audits/fairness/"
                                      "bootstrap.py)",
                         "thresholds": {"difference": st.thresholds.difference,
                                        "ratio": st.thresholds.ratio,
                                        "overrides": {f"{k[0]}:{k[1]}": v for k, v in
                                                      st.thresholds.overrides.items()}}}}


def _check_agreement(by: dict[tuple[str, ...], dict[str, float]], overall: dict[str, float],
                     p: dict[str, np.ndarray],
                     ov: dict[str, np.ndarray], keys: list[tuple[str, ...]],
                     names: list[str]) -> None:
    """MetricFrame and the bootstrap engine evaluate the same definitions; if they ever
    disagree the intervals would describe another number, so stop (this is a bug)."""
    mine = np.array([p[m] for m in names], float)
    theirs = np.array([[float(by[k][m]) for k in keys] for m in names])
    mine_ov = np.array([ov[m][0] for m in names], float)
    theirs_ov = np.array([float(overall[m]) for m in names])
    if not (np.allclose(mine, theirs, rtol=1e-9, atol=1e-12, equal_nan=True)
            and np.allclose(mine_ov, theirs_ov, rtol=1e-9, atol=1e-12, equal_nan=True)):
        raise RuntimeError("bootstrap engine and MetricFrame disagree on a point value")


def _to_overall(name: str, entry: dict[str, Any], m: str, value: float, r: np.ndarray,
                r_ov: np.ndarray, ov: float, jl: tuple[float, float], small: bool,
                prop: bool, st: AuditSettings) -> list[dict[str, Any]]:
    out = []
    for kind in ("difference", "ratio"):
        with np.errstate(all="ignore"):
            v = value - ov if kind == "difference" else (value / ov if ov else np.nan)
            reps = r - r_ov if kind == "difference" else np.where(r_ov > 0, r / r_ov, np.nan)
            ci = quantiles(reps, st.ci).tolist()
            if prop:
                j = (jl[0] - ov, jl[1] - ov) if kind == "difference" else (
                    (jl[0] / ov, jl[1] / ov) if ov else (np.nan, np.nan))
                ci = _union(ci, j)
        t = st.thresholds.get(m, kind)
        worse = bool(value > ov) if m in HIGHER_IS_WORSE else bool(value < ov)
        out.append({"slice": name, "metric": m, "kind": kind, "reference": OVERALL,
                    "group": entry["group"], "label": entry["label"], "n": entry["n"],
                    "small": small, "worse_off": worse, "group_value": value,
                    "overall_value": ov,
                    "value": float(v), "ci": ci, "threshold": t,
                    "flagged": flag(kind, ci, t) and (prop or not small)})
    return out


def _between(name: str, keys: list[tuple[str, ...]], p: dict[str, np.ndarray],
             r: dict[str, np.ndarray], keep: np.ndarray, kind: str, names: list[str],
             st: AuditSettings) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(metric: str, k: str, v: float, reps: np.ndarray, extra: dict[str, Any]) -> None:
        ci = quantiles(reps, st.ci).tolist()
        t = st.thresholds.get(metric, k)
        out.append({"slice": name, "metric": metric, "kind": k, "reference": "between_groups",
                    "value": float(v), "ci": ci, "threshold": t,
                    "flagged": flag(k, ci, t, between=True), **extra})

    pairs = {m: _pair(p[m], r[m], keep) for m in names if m not in NO_DISPARITY}
    for m, pr in pairs.items():
        if pr is None:
            continue
        hi, lo, d, q, rd, rq = pr
        extra = {"max_group": group_label(keys[hi]), "min_group": group_label(keys[lo])}
        metric = "demographic_parity" if m == "selection_rate" and kind == "binary" else m
        add(metric, "difference", d, rd, extra)
        add(metric, "ratio", q, rq, extra)
    if kind == "binary" and pairs.get("tpr") and pairs.get("fpr"):
        t, f = pairs["tpr"], pairs["fpr"]
        via, w = ("tpr", t) if t[2] >= f[2] else ("fpr", f)
        extra = {"via": via, "max_group": group_label(keys[w[0]]),
                 "min_group": group_label(keys[w[1]])}
        add("equalized_odds", "difference", max(t[2], f[2]), np.fmax(t[4], f[4]), extra)
        add("equalized_odds", "ratio", np.nanmin([t[3], f[3]]), np.fmin(t[5], f[5]),
            {"via": "tpr" if t[3] <= f[3] else "fpr"})
    return out
