"""Paired comparison of two prediction tables on the same rows (DP x fairness, point 7).

Given predictions of a DP run and of a non-private baseline on the same examples (joined on
``example_id``), what did DP cost each group? The per-group change of each metric
(``value - baseline``) gets a *paired* bootstrap interval: each resample draws rows once and
evaluates both tables on them, so the large shared variation (which rows are hard) cancels
and the interval of the change is much narrower than two independent intervals would
suggest. ``change_vs_overall`` asks whether a group paid more than everyone did on average
(the disparate impact of DP), with its own paired interval. Both carry a simultaneous
interval too (the max-t family of all groups and metrics), and ``significant`` uses it.

Mitigation (``mitigate.py``) uses the same machinery for after-versus-before.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from safelm.errors import UserError

from .audit import (METHOD, METHOD_REFERENCE, OVERALL, FairnessSettings, group_label,
                    make_slices, quantiles)
from .bootstrap import Engine
from .metrics import MetricDef, Task, encode, metric_defs
from .simultaneous import MaxT
from .table import PredTable


def join_tables(main: PredTable, other: PredTable, what: str = "--compare") -> pd.DataFrame:
    """Rows of ``main`` with ``other``'s y_pred/score as ``*_b``; refuses unpaired data."""
    for t, name in ((main, "predictions"), (other, what)):
        dup = t.df["example_id"].duplicated()
        if dup.any():
            raise UserError(f"{t.path}: example_id {t.df['example_id'][dup].iloc[0]!r} appears "
                            f"twice; {what} pairs rows by a unique example_id")
    if main.task.kind != other.task.kind:
        raise UserError(f"{other.path} is a {other.task.kind} table but {main.path} is "
                        f"{main.task.kind}; compare predictions of the same task")
    cols = ["example_id", "y_true", "y_pred"] + [c for c in ("score", "nll", "n_tokens")
                                                 if c in other.df.columns]
    joined = main.df.merge(other.df[cols], on="example_id", suffixes=("", "_b"), how="inner")
    if len(joined) == 0:
        raise UserError(f"{main.path} and {other.path} share no example_id; {what} needs "
                        "predictions for the same rows")
    differ = joined["y_true"] != joined["y_true_b"]
    if differ.any():
        raise UserError(f"example_id {joined['example_id'][differ].iloc[0]!r} has y_true "
                        f"{joined['y_true'][differ].iloc[0]!r} in {main.path} but "
                        f"{joined['y_true_b'][differ].iloc[0]!r} in {other.path}; "
                        "the tables are not predictions for the same data")
    extra = sorted(set(other.task.labels) - set(main.task.labels))
    if extra:
        raise UserError(f"{other.path} predicts label(s) {extra} that {main.path} never uses; "
                        "compare tables over the same labels")
    return joined


def paired_engine(main: PredTable, joined: pd.DataFrame, task: Task,
                  metrics: list[MetricDef], slice_cols: list[str] | None = None
                  ) -> tuple[Engine, Any]:
    """An engine with view 0 = ``main``'s predictions and view 1 = the ``*_b`` columns."""
    get = (lambda c: joined[c].to_numpy(float) if c in joined.columns else None)
    y = joined["y_true"].to_numpy(str)
    c0, x0 = encode(task, y, joined["y_pred"].to_numpy(str), get("score"), get("nll"),
                    get("n_tokens"))
    c1, x1 = encode(task, y, joined["y_pred_b"].to_numpy(str), get("score_b"), get("nll_b"),
                    get("n_tokens_b"))
    sl = make_slices(joined, slice_cols or main.sensitive)
    engine = Engine(task, metrics, sl.cell, sl.of_cell, np.stack([c0, c1], 1),
                    np.concatenate([x0, x1], 1))
    return engine, sl


def _ci(x: np.ndarray, ci: float) -> list[float]:
    return quantiles(x, ci).tolist()


def compare(main: PredTable, base: PredTable, settings: FairnessSettings) -> dict[str, Any]:
    """The ``comparison`` section of report.json: per group, metric, value - baseline.

    Every change and every change against the overall change is one comparison of a
    max-t family (``simultaneous.py``), so ``significant`` (the interval excludes 0) holds
    for all groups and metrics together; ``--error-control none`` uses the marginal ones.
    No standard-error floor here: a paired change whose replicates never vary means the two
    tables agree on every row of the group, and its interval [0, 0] then flags nothing.
    """
    joined = join_tables(main, base)
    has_score = main.task.has_score and "score_b" in joined.columns
    task = replace(main.task, has_score=has_score)
    metrics = metric_defs(task)
    engine, sl = paired_engine(main, joined, task, metrics)
    point = engine.point()
    reps = engine.bootstrap(settings.n_boot, settings.seed + 1, stratified=True)
    maxt = MaxT(settings.confidence, settings.n_boot)
    pending: list[tuple[dict[str, Any], float, float]] = []
    by_group = []
    ov_change = {m.name: reps[OVERALL][0][m.name][:, 0] - reps[OVERALL][1][m.name][:, 0]
                 for m in metrics}
    ov_point = {m.name: point[OVERALL][0][m.name][0] - point[OVERALL][1][m.name][0]
                for m in metrics}
    for name in [OVERALL] + sl.names:
        keys = sl.groups.get(name, [()])
        entries = []
        for gi, key in enumerate(keys):
            n = int(point[name][0]["n"][gi])
            entries.append({"slice": name, "group": dict(zip(sl.cols.get(name, ()), key)),
                            "label": group_label(key) if key else OVERALL, "n": n,
                            "small": n < settings.min_group_size, "metrics": {}})
        for m in metrics:
            a, b = point[name][0][m.name], point[name][1][m.name]
            d = reps[name][0][m.name] - reps[name][1][m.name]  # [B, G]
            vo = d - ov_change[m.name][:, None]
            se, se_o = maxt.add(a - b, d), maxt.add(a - b - ov_point[m.name], vo)
            ci, ci_o = _ci(d, settings.confidence), _ci(vo, settings.confidence)
            for gi, e in enumerate(entries):
                cvo = {"value": float((a[gi] - b[gi]) - ov_point[m.name]),
                       "ci": [ci_o[0][gi], ci_o[1][gi]]}
                e["metrics"][m.name] = {"value": float(a[gi]), "baseline": float(b[gi]),
                                        "change": float(a[gi] - b[gi]),
                                        "ci": [ci[0][gi], ci[1][gi]], "change_vs_overall": cvo}
                pending.append((e["metrics"][m.name], float(a[gi] - b[gi]), float(se[gi])))
                pending.append((cvo, cvo["value"], float(se_o[gi])))
        by_group += entries
    control = finish(pending, maxt, settings.error_control == "simultaneous")
    return {"baseline": str(base.path), "baseline_sha256": base.sha256,
            "rows_joined": len(joined), "rows_only_in_predictions": len(main.df) - len(joined),
            "rows_only_in_baseline": len(base.df) - len(joined),
            "change": "value - baseline", "error_control": control, "by_group": by_group}


def finish(pending: list[tuple[dict[str, Any], float, float]], maxt: MaxT,
           simultaneous: bool) -> dict[str, Any]:
    """Give each pending change its simultaneous interval and ``significant`` (the interval
    used excludes 0); returns the ``error_control`` record."""
    c = maxt.critical()
    for e, theta, se in pending:
        lo, hi = e["ci"]
        if np.isfinite(theta) and np.isfinite(se):
            lo, hi = float(np.fmin(lo, theta - c * se)), float(np.fmax(hi, theta + c * se))
        e["ci_simultaneous"] = [lo, hi]
        used = e["ci_simultaneous"] if simultaneous else e["ci"]
        e["significant"] = bool(used[0] > 0 or used[1] < 0)
    return {"mode": "simultaneous" if simultaneous else "none", "method": METHOD,
            "reference": METHOD_REFERENCE, "critical_value": c, "family_size": maxt.size,
            "significant_uses": "ci_simultaneous" if simultaneous else "ci"}
