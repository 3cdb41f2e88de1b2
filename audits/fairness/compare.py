"""Paired comparison of two prediction tables on the same rows (DP x fairness, point 7).

Given predictions of a DP run and of a non-private baseline on the same examples (joined on
``example_id``), what did DP cost each group? The per-group change of each metric
(``value - baseline``) gets a *paired* bootstrap interval: each resample draws rows once and
evaluates both tables on them, so the large shared variation (which rows are hard) cancels
and the interval of the change is much narrower than two independent intervals would
suggest. ``change_vs_overall`` asks whether a group paid more than everyone did on average
(the disparate impact of DP), with its own paired interval.

Mitigation (``mitigate.py``) uses the same machinery for after-versus-before.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from safelm.errors import UserError

from .audit import OVERALL, AuditSettings, group_label, make_slices, quantiles
from .bootstrap import Engine
from .metrics import MetricDef, Task, encode, metric_defs
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


def compare(main: PredTable, base: PredTable, settings: AuditSettings) -> dict[str, Any]:
    """The ``comparison`` section of report.json: per group, metric, value - baseline."""
    joined = join_tables(main, base)
    has_score = main.task.has_score and "score_b" in joined.columns
    task = replace(main.task, has_score=has_score)
    metrics = metric_defs(task)
    engine, sl = paired_engine(main, joined, task, metrics)
    point, reps = engine.point(), engine.bootstrap(settings.n_boot, settings.seed + 1)
    by_group = []
    ov_change = {m.name: reps[OVERALL][0][m.name][:, 0] - reps[OVERALL][1][m.name][:, 0]
                 for m in metrics}
    for name in [OVERALL] + sl.names:
        keys = sl.groups.get(name, [()])
        for gi, key in enumerate(keys):
            n = int(point[name][0]["n"][gi])
            entry = {"slice": name, "group": dict(zip(sl.cols.get(name, ()), key)),
                     "label": group_label(key) if key else OVERALL, "n": n,
                     "small": n < settings.min_group_size, "metrics": {}}
            for m in metrics:
                a, b = point[name][0][m.name][gi], point[name][1][m.name][gi]
                d = reps[name][0][m.name][:, gi] - reps[name][1][m.name][:, gi]
                ci = _ci(d, settings.ci)
                entry["metrics"][m.name] = {
                    "value": float(a), "baseline": float(b), "change": float(a - b), "ci": ci,
                    "significant": bool(ci[0] > 0 or ci[1] < 0),
                    "change_vs_overall": {
                        "value": float((a - b) - (point[OVERALL][0][m.name][0]
                                                  - point[OVERALL][1][m.name][0])),
                        "ci": _ci(d - ov_change[m.name], settings.ci)}}
            by_group.append(entry)
    return {"baseline": str(base.path), "baseline_sha256": base.sha256,
            "rows_joined": len(joined), "rows_only_in_predictions": len(main.df) - len(joined),
            "rows_only_in_baseline": len(base.df) - len(joined),
            "change": "value - baseline", "by_group": by_group}
