"""The fairness audit: per-group metrics (fairlearn MetricFrame), bootstrap intervals and
disparities with thresholds, as the report.json of docs/design.md.

Slices: every attribute alone and every intersection of attributes (all subsets for up to
three attributes; beyond that each attribute and the full intersection).

Disparities (``disparities.py``), each with a marginal interval ``ci`` and a simultaneous
one ``ci_simultaneous`` from the same resamples as the group values:

* ``reference: "overall"``: each group against the whole table, ``difference`` (group -
  overall) and ``ratio`` (group / overall);
* ``reference: "group"`` (``--reference COL=VALUE``): each group of a slice against the
  reference group (AIF360's privileged group; the comparison group of disparate-impact
  practice); in such a slice the four-fifths rule uses the reference's selection rate;
* ``reference: "between_groups"``: every pair of groups that are not small (``scope:
  "pair"``, the higher group first) and per slice the range over groups (``scope:
  "range"``: max - min, min / max; demographic parity and equalized odds for binary tasks).

Error control (``simultaneous.py``): the intervals of every comparison that can be flagged
hold jointly at the stated level (studentized max-t bootstrap, resampling within the
intersectional cells), and ``flagged`` uses them (``--error-control none``: the marginal
ones). A disparity is flagged only when its whole interval lies beyond the tolerance: a
difference outside ``[-t, t]``, a ratio outside ``[r, 1/r]``. Defaults (:class:`Thresholds`):
difference tolerance 0.1 for every classification metric; ratio threshold 0.8 (the
four-fifths rule) for selection rates, demographic parity and perplexity; other ratios are
reported but not flagged. Every disparity and group has a ``status`` (``comparisons.py``):
flagged, within_tolerance, not_flagged, insufficient_data or not_judged.

Proportion metrics (accuracy, selection rate, TPR, FPR, FNR): a percentile bootstrap
collapses at 0 and 1 and understates the uncertainty of tiny groups, so a group's interval
is joined with the Jeffreys interval, and a disparity's standard error is floored by one
from Jeffreys-smoothed counts. FNR is 1 - TPR, so its disparities would repeat TPR's and are
not listed.

Small groups (``n < min_group_size``, default 30) are kept and marked ``"small": true``; their
metrics that are not proportions are never flagged, and pairs and ranges between groups are
taken over the groups that are not small (a group of three makes any range meaningless).

``worse_off`` on a disparity to overall (or to the reference) says whether the group is on
the bad side of the metric: lower accuracy, TPR, selection rate (taking the positive label as
the favourable outcome), higher FPR, calibration error or perplexity.
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

from safelm.errors import UserError

from .bootstrap import Engine
from .comparisons import Pending
from .disparities import (HIGHER_IS_WORSE, OVERALL, equalized_odds, finish_ranges,
                          group_status, pairs, pooled_variance, side, to_other)
from .metrics import atom_metric_functions, metric_defs
from .simultaneous import MaxT
from .table import PredTable

__all__ = ["HIGHER_IS_WORSE", "OVERALL", "FairnessSettings", "Thresholds", "run_audit"]
NO_DISPARITY = ("fnr",)
ERROR_CONTROL = ("simultaneous", "none")
METHOD = ("studentized max-t bootstrap (single step) over every comparison that can be "
          "flagged, resampling rows within intersectional cells; standard errors of "
          "proportions from Jeffreys-smoothed and pooled (score-type) counts, of other "
          "metrics from half the replicates (floored), maxima from the other half")
METHOD_REFERENCE = ("Westfall & Young, Resampling-Based Multiple Testing (1993); Romano & "
                    "Wolf, JASA 100 (2005) 94-108")


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
class FairnessSettings:
    n_boot: int = 1000
    confidence: float = 0.95  # interval level (--confidence)
    seed: int = 0
    min_group_size: int = 30
    thresholds: Thresholds = field(default_factory=Thresholds)
    error_control: str = "simultaneous"  # or "none": flags use the marginal intervals
    references: dict[str, str] = field(default_factory=dict)  # column -> reference value


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


def atom_table(pt: PredTable, code: np.ndarray, cont: np.ndarray) -> pd.DataFrame:
    """One row per (sensitive values, code): ``_code``, ``_count`` and summed ``c0, c1...``
    (what :func:`metricframe_values` hands to MetricFrame; see ``atom_metric_functions``)."""
    df = pt.df[pt.sensitive].copy()
    df["_code"] = code
    df["_count"] = 1.0
    for j in range(cont.shape[1]):
        df[f"c{j}"] = cont[:, j]
    return df.groupby(pt.sensitive + ["_code"], sort=True, observed=True).sum().reset_index()


def metricframe_values(pt: PredTable, cols: tuple[str, ...], atoms: pd.DataFrame
                       ) -> tuple[dict[tuple[str, ...], dict[str, float]], dict[str, float]]:
    """fairlearn's MetricFrame over one slice: ({group key: {metric: value}}, overall)."""
    funcs = atom_metric_functions(pt.task)
    conts = {c: atoms[c].to_numpy(float) for c in atoms.columns if c.startswith("c")
             and c[1:].isdigit()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mf = MetricFrame(metrics=funcs, y_true=atoms["_code"].to_numpy(np.int64),
                         y_pred=atoms["_count"].to_numpy(float),
                         sensitive_features=atoms[list(cols)],
                         sample_params={m: conts for m in funcs} if conts else None)
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


def _union(a: list[float], b: tuple[float, float]) -> list[float]:
    if not all(np.isfinite(b)):
        return a
    return [float(np.nanmin([a[0], b[0]])), float(np.nanmax([a[1], b[1]]))]


def group_label(key: tuple[str, ...]) -> str:
    return "*".join(key)


def reference_groups(pt: PredTable, sl: Slices, n: dict[str, np.ndarray],
                     st: FairnessSettings) -> tuple[dict[str, int], list[str]]:
    """Validate ``--reference COL=VALUE`` and find each slice's reference group: a slice
    has one when every column of it has a reference (for an intersection, the combination;
    skipped, with a note, when that combination has fewer than min_group_size rows)."""
    refs = st.references
    for col, val in refs.items():
        if col not in pt.sensitive:
            raise UserError(f"--reference {col}={val}: {col!r} is not a --sensitive column "
                            f"(sensitive columns: {', '.join(pt.sensitive)}); name one of "
                            "them, or add it to --sensitive")
        values = sorted(pt.df[col].unique())
        if val not in values:
            raise UserError(f"--reference {col}={val}: column {col!r} has no group {val!r} "
                            f"(its groups: {', '.join(values[:30])}"
                            f"{' ...' if len(values) > 30 else ''}); fix the value")
        rows = int((pt.df[col] == val).sum())
        if rows < st.min_group_size:
            raise UserError(f"--reference {col}={val}: that group has {rows} rows, fewer than "
                            f"--min-group-size {st.min_group_size}, too few to compare "
                            "against; choose a larger reference group or lower "
                            "--min-group-size")
    out, notes = {}, []
    for name in sl.names:
        cols = sl.cols[name]
        if not refs or not all(c in refs for c in cols):
            continue
        key = tuple(refs[c] for c in cols)
        if key not in sl.groups[name]:
            notes.append(f"{name}: no rows in the reference combination {group_label(key)}")
            continue
        gi = sl.groups[name].index(key)
        if n[name][gi] < st.min_group_size:
            notes.append(f"{name}: reference combination {group_label(key)} has "
                         f"{int(n[name][gi])} rows (< {st.min_group_size}); compared to "
                         "overall only")
            continue
        out[name] = gi
    return out, notes


def run_audit(pt: PredTable, settings: FairnessSettings, check: bool = True) -> dict[str, Any]:
    """Everything report.json holds except ``inputs``/``versions`` (see ``report.py``).

    ``check=False`` skips fairlearn's MetricFrame (the values then come from the engine
    alone; they are identical, which ``check=True`` verifies): the calibration benchmark
    runs thousands of audits through this core.
    """
    task, st = pt.task, settings
    if st.error_control not in ERROR_CONTROL:
        raise UserError(f"--error-control {st.error_control!r}: choose "
                        f"{' or '.join(ERROR_CONTROL)}")
    metrics = metric_defs(task)
    names = [m.name for m in metrics]
    props = {m.name for m in metrics if m.proportion is not None}
    sl = make_slices(pt.df, pt.sensitive)
    code, cont = pt.encoded()
    atoms = atom_table(pt, code, cont) if check else None
    engine = Engine(task, metrics, sl.cell, sl.of_cell, code, cont)
    point = engine.point()
    refs, ref_notes = reference_groups(
        pt, sl, {s: point[s][0]["n"] for s in sl.names}, st)
    reps = engine.bootstrap(st.n_boot, st.seed, stratified=True)
    pend = Pending(MaxT(st.confidence, st.n_boot), st.error_control == "simultaneous")
    ov, rov = point[OVERALL][0], reps[OVERALL][0]
    by_group, disparities, ranges, subject = [], [], [], {}
    for name in sl.names:
        p, r, keys, cols = point[name][0], reps[name][0], sl.groups[name], sl.cols[name]
        if check:
            by, overall = metricframe_values(pt, cols, atoms)
            _check_agreement(by, overall, p, ov, keys, names)
        n = p["n"].astype(int)
        small = n < st.min_group_size
        entries = []
        for gi, key in enumerate(keys):
            e = {"slice": name, "group": dict(zip(cols, key)), "label": group_label(key),
                 "n": int(n[gi]), "small": bool(small[gi]), "metrics": {}}
            for m in names:
                value = float(by[key][m]) if check else float(p[m][gi])
                ci = quantiles(r[m][:, gi], st.confidence).tolist()
                if m in props:
                    ci = _union(ci, jeffreys(p[f"{m}:num"][gi], p[f"{m}:den"][gi], st.confidence))
                e["metrics"][m] = {"value": value, "ci": ci}
            entries.append(e)
            subject[(name, gi)] = []
        groups = [{"group": e["group"], "label": e["label"], "n": e["n"], "small": e["small"]}
                  for e in entries]
        idx = np.arange(len(keys))
        ref = refs.get(name)
        slice_ranges: dict[str, dict[str, dict[str, Any]]] = {}
        for m in names:
            if m in NO_DISPARITY:
                continue
            prop = m in props
            eligible = prop | ~small
            t = {k: st.thresholds.get(m, k) for k in ("difference", "ratio")}
            s2 = None if prop else pooled_variance(rov[m][:, 0], len(pt.df))
            t_ov = dict(t)
            if ref is not None and m.startswith("selection_rate"):
                t_ov["ratio"] = None  # the four-fifths rule compares with the reference
            ds = to_other(pend, {"slice": name, "reference": OVERALL}, groups, m, prop,
                          side(p, r, m, idx, prop),
                          side(ov, rov, m, np.zeros(len(keys), np.int64), prop),
                          True, eligible, t_ov, "overall_value", s2)
            if ref is not None:
                o = idx[idx != ref]
                base = {"slice": name, "reference": "group",
                        "reference_group": dict(zip(cols, keys[ref])),
                        "reference_label": group_label(keys[ref])}
                ds += to_other(pend, base, [groups[i] for i in o], m, prop,
                               side(p, r, m, o, prop), side(p, r, m, np.full(len(o), ref),
                                                             prop),
                               False, eligible[o], t, "reference_value", s2)
            for d in ds:
                subject[(name, keys.index(tuple(d["group"].values())))].append(d)
            metric = "demographic_parity" if m == "selection_rate" and task.kind == "binary" \
                else m
            tb = {k: st.thresholds.get(metric, k) for k in ("difference", "ratio")}
            pair_ds, rng = pairs(pend, name, keys, cols, p, r, m, metric, prop, ~small, tb,
                                 sigma2=s2)
            # pairs are listed where a tolerance applies (the others still shape the
            # range entries' intervals; report.json would triple in size with them)
            disparities += ds + [d for d in pair_ds if d["threshold"] is not None]
            if rng:
                slice_ranges[m] = rng
        ranges.append((name, slice_ranges))
        by_group += entries
    c = pend.finish()
    simultaneous = st.error_control == "simultaneous"
    for name, slice_ranges in ranges:
        for m, rng in slice_ranges.items():
            finish_ranges(list(rng.values()), simultaneous)
            disparities += list(rng.values())
        if task.kind == "binary" and "tpr" in slice_ranges and "fpr" in slice_ranges:
            t = {k: st.thresholds.get("equalized_odds", k) for k in ("difference", "ratio")}
            disparities += equalized_odds(name, slice_ranges["tpr"], slice_ranges["fpr"],
                                          st.confidence, t, simultaneous)
        for rng in slice_ranges.values():
            for e in rng.values():
                e.pop("_reps", None)
    for d in disparities:
        d["flags_use"] = "ci_simultaneous" if simultaneous else "ci"
    keys_of = {name: sl.groups[name] for name in sl.names}
    for e in by_group:
        group_status(e, subject[(e["slice"], keys_of[e["slice"]].index(
            tuple(e["group"].values())))])
    return {"task": task.kind, "labels": list(task.labels), "pos_label": task.pos_label,
            "sensitive": pt.sensitive, "slices": sl.names, "metrics": names,
            "by_group": by_group, "disparities": disparities,
            "overall": {"n": len(pt.df), "metrics": {
                m: {"value": float(ov[m][0]), "ci": quantiles(rov[m][:, 0], st.confidence).tolist()}
                for m in names}},
            "settings": {"n_boot": st.n_boot, "confidence": st.confidence, "seed": st.seed,
                         "min_group_size": st.min_group_size, "n_bins": task.n_bins,
                         "bootstrap": "multinomial over group-cell counts, within each "
                                      "intersectional cell (audits/fairness/bootstrap.py)",
                         "error_control": {
                             "mode": st.error_control, "method": METHOD,
                             "reference": METHOD_REFERENCE, "critical_value": c,
                             "family_size": pend.maxt.size,
                             "flags_use": "ci_simultaneous" if simultaneous else "ci"},
                         "references": {"groups": dict(st.references),
                                        "slices": {s: group_label(sl.groups[s][gi])
                                                   for s, gi in refs.items()},
                                        "notes": ref_notes},
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


