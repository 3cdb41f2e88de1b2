"""Every audit metric against an independent pandas (or sklearn / fairlearn) computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
from sklearn.metrics import f1_score, precision_score, recall_score

from audits.fairness.audit import FairnessSettings, run_audit
from audits.fairness.table import load_predictions
from fairness_helpers import random_binary, write

FAST = FairnessSettings(n_boot=50)


def _groups(report: dict, slice_name: str) -> dict[str, dict]:
    return {e["label"]: e for e in report["by_group"] if e["slice"] == slice_name}


def _label(key) -> str:
    return "*".join(key) if isinstance(key, tuple) else str(key)


def _binary_oracle(df: pd.DataFrame, pos: str) -> pd.Series:
    y, p = df["y_true"] == pos, df["y_pred"] == pos
    s = df["score"].clip(upper=1 - 1e-12)
    bins = pd.cut(s, np.linspace(0, 1, 11), right=False, labels=False)
    cal = pd.DataFrame({"b": bins, "y": y, "s": df["score"]}).groupby("b").sum()
    tpr, tnr = p[y].mean(), (~p[~y]).mean()
    return pd.Series({
        "accuracy": (y == p).mean(), "selection_rate": p.mean(), "tpr": tpr,
        "fpr": p[~y].mean(), "fnr": (~p[y]).mean(),
        "balanced_accuracy": np.nanmean([tpr if y.any() else np.nan,
                                         tnr if (~y).any() else np.nan]),
        "calibration_error": (cal["y"] - cal["s"]).abs().sum() / len(df)})


@pytest.fixture(scope="module")
def binary_report(tmp_path_factory):
    df = random_binary()
    path = write(df, tmp_path_factory.mktemp("m") / "p.csv")
    return df, run_audit(load_predictions(path, "g1,g2"), FAST)


@pytest.mark.parametrize("cols", [("g1",), ("g2",), ("g1", "g2")])
def test_binary_metrics_match_pandas(binary_report, cols):
    df, report = binary_report
    got = _groups(report, "*".join(cols))
    expected = df.groupby(list(cols)).apply(_binary_oracle, pos="yes", include_groups=False)
    assert len(got) == len(expected)
    for key, row in expected.iterrows():
        entry = got[_label(key)]
        assert entry["n"] == int((df[list(cols)] == list(np.atleast_1d(key))).all(axis=1).sum())
        for m, v in row.items():
            assert entry["metrics"][m]["value"] == pytest.approx(v, abs=1e-12), (key, m)


def test_overall_and_fairlearn_disparities(binary_report):
    df, report = binary_report
    oracle = _binary_oracle(df, "yes")
    for m, v in oracle.items():
        assert report["overall"]["metrics"][m]["value"] == pytest.approx(v, abs=1e-12)
    y, p = (df["y_true"] == "yes").astype(int), (df["y_pred"] == "yes").astype(int)
    sf = df[["g1", "g2"]]
    dp = {d["kind"]: d for d in report["disparities"] if d["metric"] == "demographic_parity"
          and d["slice"] == "g1*g2" and d.get("scope") == "range"}
    eo = [d for d in report["disparities"] if d["metric"] == "equalized_odds"
          and d["slice"] == "g1*g2" and d["kind"] == "difference"][0]
    assert dp["difference"]["value"] == pytest.approx(
        demographic_parity_difference(y, p, sensitive_features=sf), abs=1e-12)
    assert eo["value"] == pytest.approx(equalized_odds_difference(y, p, sensitive_features=sf),
                                        abs=1e-12)
    # a group's ratio to overall is the plain quotient of the two selection rates
    r = [d for d in report["disparities"] if d["metric"] == "selection_rate"
         and d["kind"] == "ratio" and d["label"] == "c*y"][0]
    sel = df.groupby(["g1", "g2"])["y_pred"].apply(lambda s: (s == "yes").mean())
    assert r["value"] == pytest.approx(sel[("c", "y")] / (df["y_pred"] == "yes").mean())


def test_pos_label_switches_the_positive_class(tmp_path):
    df = random_binary(n=500)
    path = write(df, tmp_path / "p.csv")
    rep = run_audit(load_predictions(path, "g2", pos_label="no"), FAST)
    flipped = df.assign(score=1 - df["score"])  # `score` is P(labels[1]) = P("yes")
    expected = flipped.groupby("g2").apply(_binary_oracle, pos="no", include_groups=False)
    for key, row in expected.iterrows():
        for m, v in row.items():
            assert _groups(rep, "g2")[key]["metrics"][m]["value"] == pytest.approx(v, abs=1e-12)


def test_multiclass_metrics_match_pandas_and_sklearn(tmp_path):
    rng = np.random.default_rng(1)
    n, labels = 2000, ["cat", "dog", "emu"]
    y = rng.choice(labels, n, p=[0.5, 0.3, 0.2])
    pred = np.where(rng.random(n) < 0.7, y, rng.choice(labels, n))
    probs = rng.dirichlet([1, 1, 1], n)
    df = pd.DataFrame({"example_id": range(n), "y_true": y, "y_pred": pred,
                       "g": rng.choice(["u", "v"], n)})
    for i, c in enumerate(labels):
        df[f"score_{c}"] = probs[:, i]
    rep = run_audit(load_predictions(write(df, tmp_path / "m.csv"), "g"), FAST)
    assert rep["task"] == "multiclass"
    conf = probs[np.arange(n), [labels.index(v) for v in pred]]
    for key, grp in df.groupby("g"):
        got = _groups(rep, "g")[key]["metrics"]
        recall = grp.assign(ok=grp["y_true"] == grp["y_pred"]).groupby("y_true")["ok"].mean()
        c = conf[grp.index]
        bins = np.minimum((c * 10).astype(int), 9)
        ok = (grp["y_true"] == grp["y_pred"]).to_numpy()
        ece = sum(abs(ok[bins == b].sum() - c[bins == b].sum()) for b in range(10)) / len(grp)
        expected = {"accuracy": (grp["y_true"] == grp["y_pred"]).mean(),
                    "balanced_accuracy": recall.mean(),
                    "macro_f1": f1_score(grp["y_true"], grp["y_pred"], average="macro"),
                    "macro_precision": precision_score(grp["y_true"], grp["y_pred"],
                                                       average="macro", zero_division=0),
                    "macro_recall": recall_score(grp["y_true"], grp["y_pred"], average="macro"),
                    "calibration_error": ece,
                    **{f"selection_rate_{c}": (grp["y_pred"] == c).mean() for c in labels}}
        for m, v in expected.items():
            assert got[m]["value"] == pytest.approx(v, abs=1e-12), (key, m)


def test_lm_perplexity_matches_pandas(tmp_path):
    rng = np.random.default_rng(2)
    n = 800
    df = pd.DataFrame({"example_id": range(n), "y_true": "", "y_pred": "",
                       "nll": rng.gamma(2.0, 1.0, n), "n_tokens": rng.integers(0, 40, n),
                       "dialect": rng.choice(["d1", "d2", "d3"], n)})
    rep = run_audit(load_predictions(write(df, tmp_path / "lm.csv"), "dialect"), FAST)
    assert rep["task"] == "lm" and rep["metrics"] == ["perplexity"]
    for key, grp in df.groupby("dialect"):
        ppl = np.exp((grp["nll"] * grp["n_tokens"]).sum() / grp["n_tokens"].sum())
        assert _groups(rep, "dialect")[key]["metrics"]["perplexity"]["value"] == pytest.approx(
            ppl, rel=1e-12)
        assert _groups(rep, "dialect")[key]["n"] == len(grp)
