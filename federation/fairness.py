"""Per-group metrics of the global model from per-group COUNTS that clients send.

A client scores its own evaluation rows with the global model and reduces them, per value of
each group column, to a fixed vector of sums (:data:`FIELDS`): no example, prediction or
sensitive attribute of a person leaves the client, only "in group gender=female: 41 rows, 37
correct, ...". The server adds the vectors up; because every metric below is a ratio of sums,
the result is exactly what it would compute on the union of the clients' rows (a test checks
this against a central predictions table).

Binary "positive" class: ``labels[1]`` of the sorted labels, the class whose probability is the
``score`` column of SafeLM's predictions table.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

FIELDS = ("n", "correct", "nll_sum", "pred_pos", "label_pos", "true_pos", "tokens")


def group_counts(rows: pd.DataFrame, columns: list[str], task: str, *,
                 nll: np.ndarray, n_tokens: np.ndarray,
                 y_true: np.ndarray | None = None, y_pred: np.ndarray | None = None,
                 positive: int = 1) -> dict[str, list[float]]:
    """``{"col=value": [sums in FIELDS order]}`` for every group value present in ``rows``.

    ``nll`` is per row (mean per token for LM, label cross-entropy for classification) and
    ``n_tokens`` the row's token count; ``y_true``/``y_pred`` are class ids (classification).
    """
    n = len(rows)
    ones = np.ones(n)
    if task == "lm":
        tok = n_tokens.astype(float)
        per_row = np.stack([ones, np.zeros(n), nll * tok, np.zeros(n), np.zeros(n),
                            np.zeros(n), tok], axis=1)
    else:
        correct = (y_true == y_pred).astype(float)
        pred_pos = (y_pred == positive).astype(float)
        label_pos = (y_true == positive).astype(float)
        per_row = np.stack([ones, correct, nll, pred_pos, label_pos, pred_pos * label_pos,
                            ones], axis=1)
    out: dict[str, list[float]] = {}
    for col in columns:
        values = rows[col].astype(str).to_numpy()
        for v in np.unique(values):
            out[f"{col}={v}"] = per_row[values == v].sum(axis=0).tolist()
    return out


def add_counts(parts: Iterable[Mapping[str, Iterable[float]]]) -> dict[str, list[float]]:
    """Sum per-group count vectors from several clients."""
    total: dict[str, np.ndarray] = {}
    for part in parts:
        for key, vec in part.items():
            total[key] = total.get(key, np.zeros(len(FIELDS))) + np.asarray(list(vec), float)
    return {k: v.tolist() for k, v in sorted(total.items())}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def group_metrics(counts: Mapping[str, Iterable[float]], task: str) -> list[dict[str, Any]]:
    """Metrics per group from summed counts (``None`` where a denominator is 0)."""
    out = []
    for key, vec in sorted(counts.items()):
        c = dict(zip(FIELDS, vec))
        col, value = key.split("=", 1)
        rec: dict[str, Any] = {"column": col, "group": value, "n": int(c["n"])}
        if task == "lm":
            mean = _ratio(c["nll_sum"], c["tokens"])
            rec.update(nll=mean, perplexity=math.exp(min(mean, 50.0)) if mean is not None
                       else None)
        else:
            rec.update(accuracy=_ratio(c["correct"], c["n"]),
                       selection_rate=_ratio(c["pred_pos"], c["n"]),
                       tpr=_ratio(c["true_pos"], c["label_pos"]),
                       nll=_ratio(c["nll_sum"], c["n"]))
        out.append(rec)
    return out


def disparities(metrics: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per column, max - min over its groups of each metric (the fairlearn "difference")."""
    names = [k for k in ("accuracy", "selection_rate", "tpr", "perplexity")
             if any(k in m for m in metrics)]
    out: dict[str, dict[str, float]] = {}
    for col in sorted({m["column"] for m in metrics}):
        rows = [m for m in metrics if m["column"] == col]
        gaps = {}
        for name in names:
            vals = [m[name] for m in rows if m.get(name) is not None]
            if len(vals) >= 2:
                gaps[f"{name}_difference"] = max(vals) - min(vals)
        out[col] = gaps
    return out
