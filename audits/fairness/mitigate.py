"""Mitigation, before and after: fairlearn's ThresholdOptimizer on a classifier's scores, and
the report of an in-training mitigation (a model retrained with ``train.reweight``).

Why post-processing on scores: it needs only the predictions table (no retraining, any model),
and it states its price plainly: group-specific (possibly randomized) thresholds that trade
some accuracy for parity. The optimizer is fit on one table (e.g. validation predictions) and
evaluated on another (the test predictions), never on the rows it was fit on, so the
before/after numbers are honest. The model is a pass-through estimator whose "prediction" is
the score column itself, with ``prefit=True``.

Groups are the full intersection of the sensitive columns. The report gets, per constraint,
accuracy / selection rate / TPR / FPR before and after with paired bootstrap intervals, the
accuracy cost (before - after), and the demographic-parity and equalized-odds differences
before and after with intervals: the marginal one of the highest-minus-lowest pair, and a
simultaneous one from every pair of groups (see ``before_after``).

An in-training mitigation changes the model, not its thresholds, so its "before" is a second
predictions table (``--unmitigated``: the same model trained without it, on the same rows)
and everything else, the paired intervals included, is the same computation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from safelm.errors import UserError

from .audit import OVERALL, FairnessSettings, group_label, quantiles
from .compare import finish, join_tables, paired_engine
from .comparisons import Pending
from .disparities import pairs, range_interval
from .metrics import metric_defs
from .simultaneous import MaxT
from .table import PredTable

CONSTRAINTS = ("demographic_parity", "equalized_odds")
MITIGATION_METRICS = ("accuracy", "selection_rate", "tpr", "fpr")


class PassThrough(BaseEstimator):
    """An already-'fitted' estimator whose prediction is its one input column (the score)."""

    def __init__(self) -> None:
        self.fitted_ = True  # sklearn's check_is_fitted looks for a trailing-underscore attr

    def fit(self, X: Any, y: Any = None, **kwargs: Any) -> "PassThrough":
        return self

    def predict(self, X: Any) -> np.ndarray:
        return np.asarray(X, float)[:, 0]


def _groups(pt: PredTable) -> np.ndarray:
    return pt.df[pt.sensitive].astype(str).agg("*".join, axis=1).to_numpy()


def _check(test: PredTable, fit: PredTable) -> None:
    for t in (test, fit):
        if t.task.kind != "binary" or not t.task.has_score:
            raise UserError(f"{t.path}: --mitigate needs binary predictions with a score "
                            "column (a probability of the positive class)")
    if fit.task.labels != test.task.labels or fit.task.pos_label != test.task.pos_label:
        raise UserError(f"{fit.path} has labels {list(fit.task.labels)} but {test.path} has "
                        f"{list(test.task.labels)}; fit and evaluate on the same labels")
    missing = sorted(set(_groups(test)) - set(_groups(fit)))
    if missing:
        raise UserError(f"groups {missing[:5]} of {test.path} do not occur in --fit-predictions "
                        f"{fit.path}; thresholds are per group, so every group needs fit rows")


def threshold_optimize(test: PredTable, fit: PredTable, constraint: str, seed: int = 0
                       ) -> np.ndarray:
    """Mitigated predicted labels for ``test``, thresholds fit on ``fit``."""
    from fairlearn.postprocessing import ThresholdOptimizer
    if constraint not in CONSTRAINTS:
        raise UserError(f"--mitigate {constraint!r}: choose from {', '.join(CONSTRAINTS)}")
    _check(test, fit)
    pos = test.task.pos_label
    neg = next(c for c in test.task.labels if c != pos)
    y_fit = (fit.df["y_true"] == pos).astype(int).to_numpy()
    if y_fit.min() == y_fit.max():
        raise UserError(f"{fit.path}: every y_true is the same label; the thresholds need "
                        "both classes to fit")
    opt = ThresholdOptimizer(estimator=PassThrough(), constraints=constraint,
                             objective="accuracy_score", prefit=True, predict_method="predict")
    opt.fit(fit.df[["score"]].to_numpy(float), y_fit, sensitive_features=_groups(fit))
    out = opt.predict(test.df[["score"]].to_numpy(float), sensitive_features=_groups(test),
                      random_state=seed)
    return np.where(np.asarray(out) == 1, pos, neg)


def mitigate(test: PredTable, fit: PredTable, constraint: str, settings: FairnessSettings
             ) -> dict[str, Any]:
    """One entry of report.json's ``mitigation`` list: thresholds fit on ``fit``."""
    after = threshold_optimize(test, fit, constraint, settings.seed)
    joined = test.df.assign(y_pred_b=test.df["y_pred"], score_b=test.df["score"],
                            y_pred=after)  # view 0 = after, view 1 = before
    return {"method": "fairlearn.postprocessing.ThresholdOptimizer (prefit, scores)",
            "constraint": constraint, "fit_on": str(fit.path), "fit_sha256": fit.sha256,
            "fit_rows": len(fit.df), "evaluated_on": str(test.path),
            **before_after(test, joined, settings)}


def training_mitigation(after: PredTable, before: PredTable, settings: FairnessSettings,
                        method: str = "") -> dict[str, Any]:
    """The ``mitigation`` entry of an in-training mitigation (e.g. ``train.reweight``).

    ``after`` holds the mitigated model's predictions, ``before`` the same model trained
    without the mitigation, on the same rows (paired by example_id), so the intervals of the
    change are paired as for the thresholds.
    """
    if after.task.kind != "binary":
        raise UserError(f"{after.path}: --unmitigated reports binary tasks (selection rate, "
                        "TPR, FPR); use --compare for a per-group comparison of other tasks")
    joined = join_tables(after, before, "--unmitigated")
    return {"method": method or "in-training mitigation (the audited model was retrained)",
            "constraint": "in_training", "unmitigated": str(before.path),
            "unmitigated_sha256": before.sha256, "rows_paired": len(joined),
            "evaluated_on": str(after.path), **before_after(after, joined, settings)}


def before_after(test: PredTable, joined: Any, settings: FairnessSettings) -> dict[str, Any]:
    """Before/after metrics with paired intervals; ``joined`` holds the after-predictions in
    ``y_pred`` and the before-predictions in ``y_pred_b``.

    Error control as in the audit: the changes (per group and overall) and every pair of
    groups behind the demographic-parity and equalized-odds differences, before and after,
    form one max-t family; each change and gap carries ``ci_simultaneous`` (the gaps' follow
    from their pairs, as in ``disparities.py``), and a change is ``significant`` when the
    interval used excludes 0.
    """
    metrics = [m for m in metric_defs(test.task) if m.name in MITIGATION_METRICS]
    engine, sl = paired_engine(test, joined, test.task, metrics)
    full = "*".join(test.sensitive)
    point = engine.point()
    reps = engine.bootstrap(settings.n_boot, settings.seed + 2, stratified=True)
    ci, simultaneous = settings.confidence, settings.error_control == "simultaneous"
    maxt = MaxT(ci, settings.n_boot)
    pend = Pending(maxt, simultaneous, all_in_family=True)
    pending: list[tuple[dict[str, Any], float, float]] = []

    def pair(slice_name: str, m: str, gi: int) -> dict[str, Any]:
        a, b = reps[slice_name][0][m][:, gi], reps[slice_name][1][m][:, gi]
        pa, pb = point[slice_name][0][m][gi], point[slice_name][1][m][gi]
        change = {"value": float(pa - pb), "ci": quantiles(a - b, ci).tolist()}
        se = maxt.add(np.array([pa - pb]), (a - b)[:, None])
        pending.append((change, float(pa - pb), float(se[0])))
        return {"before": {"value": float(pb), "ci": quantiles(b, ci).tolist()},
                "after": {"value": float(pa), "ci": quantiles(a, ci).tolist()},
                "change": change}

    overall = {m: pair(OVERALL, m, 0) for m in MITIGATION_METRICS}
    keys, cols = sl.groups[full], tuple(test.sensitive)
    ranges: dict[tuple[int, str], dict[str, Any]] = {}
    for view in (1, 0):
        p, r = point[full][view], reps[full][view]
        keep = np.ones(len(p["n"]), bool)
        for m in ("selection_rate", "tpr", "fpr"):
            _, rng = pairs(pend, full, keys, cols, p, r, m, m, True, keep,
                           {"difference": None, "ratio": None}, kinds=("difference",))
            ranges[(view, m)] = rng.get("difference")
    by_group = [{"group": dict(zip(test.sensitive, k)), "label": group_label(k),
                 "n": int(point[full][0]["n"][gi]),
                 "metrics": {m: pair(full, m, gi) for m in MITIGATION_METRICS}}
                for gi, k in enumerate(keys)]
    pend.finish()
    control = finish(pending, maxt, simultaneous)
    gaps: dict[str, dict[str, Any]] = {}
    for view, key in ((1, "before"), (0, "after")):  # ranges as in audit.py
        sel, tpr, fpr = (ranges[(view, m)] for m in ("selection_rate", "tpr", "fpr"))
        for e in (sel, tpr, fpr):
            e["ci_simultaneous"] = range_interval("difference", [d["ci_simultaneous"]
                                                                 for d in e["_pairs"]])
        gaps.setdefault("demographic_parity_difference", {})[key] = {
            "value": sel["value"], "ci": sel["ci"], "ci_simultaneous": sel["ci_simultaneous"]}
        gaps.setdefault("equalized_odds_difference", {})[key] = {
            "value": max(tpr["value"], fpr["value"]),
            "ci": quantiles(np.fmax(tpr["_reps"], fpr["_reps"]), ci).tolist(),
            "ci_simultaneous": [max(tpr["ci_simultaneous"][0], fpr["ci_simultaneous"][0]),
                                max(tpr["ci_simultaneous"][1], fpr["ci_simultaneous"][1])]}
    acc = overall["accuracy"]["change"]
    return {"slice": full, "overall": overall,
            "accuracy_cost": {"value": -acc["value"], "ci": sorted(-x for x in acc["ci"]),
                              "ci_simultaneous": sorted(-x for x in acc["ci_simultaneous"])},
            "disparities": gaps, "by_group": by_group, "error_control": control}
