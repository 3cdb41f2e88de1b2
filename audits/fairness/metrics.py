"""Group metrics as functions of per-group sufficient statistics.

Why sufficient statistics: every metric of the audit is a function of a few per-group sums
(confusion counts; per calibration bin the count, positives and summed scores; summed NLL and
tokens). Writing each metric once, as a vectorized function of those sums, gives

* the sklearn-signature functions ``f(y_true, y_pred, **params)`` that fairlearn's
  ``MetricFrame`` evaluates per group (:func:`metric_functions`), and
* the fast bootstrap (``bootstrap.py``), which resamples the sums directly and evaluates the
  same functions on arrays of shape ``[n_boot, n_groups]``,

from one definition, so the point values and their intervals cannot drift apart.

Each row is encoded as one discrete ``code`` (binary: truth x prediction x score bin;
multiclass: truth x prediction x confidence bin; LM: 0) and a few continuous values (score or
confidence; NLL x tokens and tokens). A *stat* sums counts or one continuous column over the
rows whose code maps to each of its fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

Stats = dict[str, np.ndarray]  # name -> [..., G, F]


@dataclass(frozen=True)
class Task:
    """What the predictions table supports: ``binary`` / ``multiclass`` / ``lm``."""

    kind: str
    labels: tuple[str, ...]
    pos_label: str | None
    has_score: bool
    n_bins: int = 10

    @property
    def n_cont(self) -> int:
        return {"binary": int(self.has_score), "multiclass": int(self.has_score), "lm": 2}[
            self.kind]

    @property
    def n_codes(self) -> int:
        if self.kind == "lm":
            return 1
        k = 2 if self.kind == "binary" else len(self.labels)
        return k * k * self.n_bins


@dataclass(frozen=True)
class StatDef:
    name: str
    field_of_code: np.ndarray  # [n_codes] -> field index, -1 = not counted
    n_fields: int
    cont: int | None  # None: count rows; else sum this continuous column


@dataclass(frozen=True)
class MetricDef:
    name: str
    fn: Callable[[Stats], np.ndarray]  # stats [..., G, F] -> [..., G]
    proportion: Callable[[Stats], tuple[np.ndarray, np.ndarray]] | None = None  # (num, den)


# ---- encoding rows -----------------------------------------------------------------------
def _bin(x: np.ndarray, n_bins: int) -> np.ndarray:
    return np.clip(np.floor(x * n_bins).astype(np.int64), 0, n_bins - 1)


def encode(task: Task, y_true: np.ndarray, y_pred: np.ndarray, score: np.ndarray | None = None,
           nll: np.ndarray | None = None, n_tokens: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Rows -> (code [N] int64, continuous [N, n_cont] float64).

    ``score`` is P(positive) for binary tasks and the probability given to the predicted class
    (the confidence) for multiclass ones; without it (a metric that does not read scores),
    the score bins and sums are zeros.
    """
    n = len(y_true)
    if task.kind == "lm":
        t = np.asarray(n_tokens, float)
        return np.zeros(n, np.int64), np.stack([np.asarray(nll, float) * t, t], axis=1)
    nb = task.n_bins
    if task.kind == "binary":
        y = (np.asarray(y_true) == task.pos_label).astype(np.int64)
        yh = (np.asarray(y_pred) == task.pos_label).astype(np.int64)
        s = np.asarray(score, float) if score is not None else np.zeros(n)
        return (y * 2 + yh) * nb + _bin(s, nb), s.reshape(n, -1)[:, : task.n_cont]
    index = {c: i for i, c in enumerate(task.labels)}
    yi = np.array([index[v] for v in y_true], dtype=np.int64)
    pi = np.array([index[v] for v in y_pred], dtype=np.int64)
    conf = np.asarray(score, float) if score is not None else np.zeros(n)
    k = len(task.labels)
    return (yi * k + pi) * nb + _bin(conf, nb), conf.reshape(n, -1)[:, : task.n_cont]


def stat_defs(task: Task) -> list[StatDef]:
    """How each stat reads the codes (see the module docstring)."""
    if task.kind == "lm":
        zero = np.zeros(1, np.int64)
        return [StatDef("rows", zero, 1, None), StatDef("nll", zero, 1, 0),
                StatDef("tok", zero, 1, 1)]
    nb = task.n_bins
    codes = np.arange(task.n_codes)
    pair, b = codes // nb, codes % nb  # pair = truth * k + prediction
    k = 2 if task.kind == "binary" else len(task.labels)
    correct = (pair // k) == (pair % k) if task.kind == "multiclass" else (pair // 2) == 1
    defs = [StatDef("cm", pair, k * k, None)]
    if task.has_score:  # binary: positives per score bin; multiclass: correct per conf bin
        defs += [StatDef("cal_n", b, nb, None), StatDef("cal_pos", np.where(correct, b, -1), nb,
                                                         None), StatDef("cal_sum", b, nb, 0)]
    return defs


def stats_from_rows(task: Task, code: np.ndarray, cont: np.ndarray, group: np.ndarray,
                    n_groups: int) -> Stats:
    """Sufficient statistics [G, F] of rows by group (used for MetricFrame and as an oracle)."""
    out = {}
    for d in stat_defs(task):
        f = d.field_of_code[code]
        keep = f >= 0
        idx = group[keep] * d.n_fields + f[keep]
        w = None if d.cont is None else cont[keep, d.cont]
        out[d.name] = np.bincount(idx, weights=w, minlength=n_groups * d.n_fields).astype(
            float).reshape(n_groups, d.n_fields)
    return out


# ---- metrics from stats ----------------------------------------------------------------------
def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _bin_cm(s: Stats) -> tuple[np.ndarray, ...]:
    cm = s["cm"]
    return cm[..., 0], cm[..., 1], cm[..., 2], cm[..., 3]  # tn, fp, fn, tp


def _cm_k(s: Stats) -> np.ndarray:
    cm = s["cm"]
    k = int(round(np.sqrt(cm.shape[-1])))
    return cm.reshape(cm.shape[:-1] + (k, k))  # [..., G, true, pred]


def _calibration(s: Stats) -> np.ndarray:
    """Expected calibration error: sum over bins |positives - summed score| / n."""
    gap = np.abs(s["cal_pos"] - s["cal_sum"]).sum(-1)
    return _div(gap, s["cal_n"].sum(-1))


def _binary(task: Task) -> list[MetricDef]:
    def p(num: Callable, den: Callable) -> Callable[[Stats], tuple[np.ndarray, np.ndarray]]:
        return lambda s: (num(*_bin_cm(s)), den(*_bin_cm(s)))

    acc = p(lambda tn, fp, fn, tp: tp + tn, lambda tn, fp, fn, tp: tn + fp + fn + tp)
    sel = p(lambda tn, fp, fn, tp: tp + fp, lambda tn, fp, fn, tp: tn + fp + fn + tp)
    tpr = p(lambda tn, fp, fn, tp: tp, lambda tn, fp, fn, tp: tp + fn)
    fpr = p(lambda tn, fp, fn, tp: fp, lambda tn, fp, fn, tp: fp + tn)
    fnr = p(lambda tn, fp, fn, tp: fn, lambda tn, fp, fn, tp: tp + fn)

    def ratio(prop: Callable) -> Callable[[Stats], np.ndarray]:
        return lambda s: _div(*prop(s))

    def balanced(s: Stats) -> np.ndarray:
        tn, fp, fn, tp = _bin_cm(s)
        with np.errstate(all="ignore"):  # mean recall over the classes present in y_true
            r = np.stack([_div(tp, tp + fn), _div(tn, tn + fp)])
            return np.where(np.isnan(r).all(0), np.nan, np.nansum(r, 0) / (~np.isnan(r)).sum(0))

    out = [MetricDef("accuracy", ratio(acc), acc), MetricDef("balanced_accuracy", balanced),
           MetricDef("selection_rate", ratio(sel), sel), MetricDef("tpr", ratio(tpr), tpr),
           MetricDef("fpr", ratio(fpr), fpr), MetricDef("fnr", ratio(fnr), fnr)]
    if task.has_score:
        out.append(MetricDef("calibration_error", _calibration))
    return out


def _multiclass(task: Task) -> list[MetricDef]:
    def acc(s: Stats) -> tuple[np.ndarray, np.ndarray]:
        cm = _cm_k(s)
        return np.trace(cm, axis1=-2, axis2=-1), cm.sum((-2, -1))

    def per_class(s: Stats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cm = _cm_k(s)
        return np.diagonal(cm, axis1=-2, axis2=-1), cm.sum(-1), cm.sum(-2)  # tp, true, pred

    def balanced(s: Stats) -> np.ndarray:
        tp, true, _ = per_class(s)
        present = true > 0
        return _div(np.where(present, _div(tp, true), 0).sum(-1), present.sum(-1))

    def macro(which: str) -> Callable[[Stats], np.ndarray]:
        def fn(s: Stats) -> np.ndarray:  # sklearn's average="macro" over labels seen in group
            tp, true, pred = per_class(s)
            prec, rec = np.nan_to_num(_div(tp, pred)), np.nan_to_num(_div(tp, true))
            f1 = np.nan_to_num(_div(2 * prec * rec, prec + rec))
            v = {"precision": prec, "recall": rec, "f1": f1}[which]
            seen = (true + pred) > 0
            return _div(np.where(seen, v, 0).sum(-1), seen.sum(-1))
        return fn

    def sel(i: int) -> Callable[[Stats], tuple[np.ndarray, np.ndarray]]:
        return lambda s: (per_class(s)[2][..., i], _cm_k(s).sum((-2, -1)))

    out = [MetricDef("accuracy", lambda s: _div(*acc(s)), acc),
           MetricDef("balanced_accuracy", balanced), MetricDef("macro_precision", macro(
               "precision")), MetricDef("macro_recall", macro("recall")),
           MetricDef("macro_f1", macro("f1"))]
    for i, c in enumerate(task.labels):
        out.append(MetricDef(f"selection_rate_{c}", partial(lambda i, s: _div(*sel(i)(s)), i),
                             sel(i)))
    if task.has_score:
        out.append(MetricDef("calibration_error", _calibration))
    return out


def metric_defs(task: Task) -> list[MetricDef]:
    """The audit's metrics for this task, in report order."""
    if task.kind == "binary":
        return _binary(task)
    if task.kind == "multiclass":
        return _multiclass(task)
    return [MetricDef("perplexity", lambda s: np.exp(_div(s["nll"][..., 0], s["tok"][..., 0])))]


def count(s: Stats) -> np.ndarray:
    """Rows per group."""
    return s["cm"].sum(-1) if "cm" in s else s["rows"][..., 0]


# ---- sklearn-signature functions for fairlearn's MetricFrame ---------------------------------
def _sklearn_metric(task: Task, metric: MetricDef, y_true, y_pred, **params) -> float:
    code, cont = encode(task, np.asarray(y_true), np.asarray(y_pred), params.get("score"),
                        params.get("nll"), params.get("n_tokens"))
    s = stats_from_rows(task, code, cont, np.zeros(len(code), np.int64), 1)
    return float(metric.fn(s)[0])


def metric_functions(task: Task) -> dict[str, Callable[..., float]]:
    """``{name: f(y_true, y_pred, **params)}``; params are the per-row arrays of
    :func:`sample_param_names` (fairlearn's ``sample_params`` split them by group)."""
    return {m.name: partial(_sklearn_metric, task, m) for m in metric_defs(task)}


def _atom_metric(task: Task, metric: MetricDef, code, count, **cont) -> float:
    code = np.asarray(code, np.int64)
    w = np.asarray(count, float)
    sums = np.stack([np.asarray(cont[f"c{j}"], float) for j in range(task.n_cont)], 1) \
        if task.n_cont else np.zeros((len(code), 0))
    s = {}
    for d in stat_defs(task):  # as stats_from_rows, with each atom weighted by its rows
        f = d.field_of_code[code]
        keep = f >= 0
        x = w[keep] if d.cont is None else sums[keep, d.cont]
        s[d.name] = np.bincount(f[keep], weights=x, minlength=d.n_fields).astype(float)[None]
    return float(metric.fn(s)[0])


def atom_metric_functions(task: Task) -> dict[str, Callable[..., float]]:
    """``{name: f(code, count, c0=..., c1=...)}`` for a MetricFrame over *atoms*: one row per
    (intersectional cell, code) with its row count and summed continuous columns.

    Why: fairlearn 0.15's MetricFrame converts every argument of every metric call element by
    element (``np.stack`` in ``AnnotatedMetricFunction``), about 100 s for the seven slices
    of a 1,000,000-row table; rows of one atom are interchangeable for every metric here
    (``bootstrap.py``), so MetricFrame over the weighted atoms gives the same per-group values
    in milliseconds. ``y_true`` carries the code and ``y_pred`` the count.
    """
    return {m.name: partial(_atom_metric, task, m) for m in metric_defs(task)}


def sample_param_names(task: Task) -> tuple[str, ...]:
    if task.kind == "lm":
        return ("nll", "n_tokens")
    return ("score",) if task.has_score else ()
