"""A reference group (point 3), "insufficient data" as a verdict (point 4), error control in
--compare (point 6) and bad --reference input (point 8)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from audits.fairness.audit import FairnessSettings
from audits.fairness.pipeline import fairness_audit
from fairness_helpers import write
from safelm.cli import main

FAST = FairnessSettings(n_boot=200)


def table(n: int, rates: dict[str, float], seed: int = 0, sizes: dict[str, float] | None = None
          ) -> pd.DataFrame:
    """Binary predictions; ``rates`` = selection rate per value of column ``grp``; a second
    column ``reg`` unrelated to anything."""
    rng = np.random.default_rng(seed)
    names = list(rates)
    p = np.array([(sizes or {}).get(k, 1.0) for k in names])
    g = rng.choice(names, n, p=p / p.sum())
    y = rng.random(n) < 0.5
    pred = rng.random(n) < np.array([rates[v] for v in g])
    return pd.DataFrame({"example_id": [f"e{i}" for i in range(n)],
                         "y_true": np.where(y, "yes", "no"), "y_pred": np.where(pred, "yes", "no"),
                         "grp": g, "reg": rng.choice(["n", "s"], n)})


def _ref(rep, label, metric="selection_rate", kind="ratio"):
    return [d for d in rep["disparities"] if d["reference"] == "group" and d["label"] == label
            and d["metric"] == metric and d["kind"] == kind][0]


def test_reference_values_match_pandas_and_the_four_fifths_rule_uses_it(tmp_path):
    df = table(4000, {"a": 0.6, "b": 0.55, "c": 0.3})
    rep = fairness_audit(write(df, tmp_path / "p.csv"), "grp,reg",
                         settings=FairnessSettings(n_boot=200, references={"grp": "a"}))
    sel = df.assign(s=df["y_pred"] == "yes").groupby("grp")["s"].mean()
    for g in ("b", "c"):
        r, d = _ref(rep, g), _ref(rep, g, kind="difference")
        assert r["reference_group"] == {"grp": "a"} and r["group"] == {"grp": g}
        assert r["value"] == pytest.approx(sel[g] / sel["a"], abs=1e-12)
        assert d["value"] == pytest.approx(sel[g] - sel["a"], abs=1e-12)
        assert r["threshold"] == 0.8 and r["reference_value"] == pytest.approx(sel["a"])
        for e in (r, d):
            lo, hi = e["ci_simultaneous"]
            assert lo <= e["value"] <= hi and lo <= e["ci"][0] and hi >= e["ci"][1]
    assert _ref(rep, "c")["flagged"] and not _ref(rep, "b")["flagged"]  # 0.5 vs 0.92
    assert not any(d["reference"] == "group" and d["label"] == "a" for d in rep["disparities"])
    # in a slice with a reference, the ratio to overall is reported but not judged
    ov = [d for d in rep["disparities"] if d["reference"] == "overall" and d["slice"] == "grp"
          and d["metric"] == "selection_rate" and d["kind"] == "ratio"]
    assert all(d["threshold"] is None and d["status"] == "not_judged" for d in ov)
    assert rep["settings"]["references"]["slices"] == {"grp": "a"}
    assert rep["summary"]["flagged"][0].startswith(
        f"c: selection rate {sel['c']:.2f} vs {sel['a']:.2f} for a (reference), ratio 0.")


def test_reference_null_flags_nothing(tmp_path):
    for seed in range(3):
        df = table(3000, {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5}, seed=seed)
        rep = fairness_audit(write(df, tmp_path / "p.csv"), "grp,reg", settings=FairnessSettings(
            n_boot=200, references={"grp": "b", "reg": "n"}))
        assert rep["summary"]["n_flagged"] == 0, rep["summary"]["flagged"]
        assert set(rep["settings"]["references"]["slices"]) == {"grp", "reg", "grp*reg"}


def test_reference_through_the_cli_and_html(tmp_path, capsys):
    path = write(table(3000, {"a": 0.6, "b": 0.55, "c": 0.3}), tmp_path / "p.csv")
    rc = main(["audit", "fairness", "--predictions", str(path), "--sensitive", "grp",
               "--reference", "grp=a", "--out", str(tmp_path / "o"), "--n-boot", "200"])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"c: selection rate 0\.\d\d vs 0\.\d\d for a \(reference\), ratio 0\.\d\d "
                     r"\[0\.\d\d, 0\.\d\d\], below the 4/5 threshold", out), out
    assert "against the reference group (grp=a): " in out
    html = (tmp_path / "o" / "report.html").read_text()
    assert "Against the reference group" in html and "FLAGGED" in html
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert {d["reference"] for d in rep["disparities"]} == {"overall", "group",
                                                           "between_groups"}


@pytest.mark.parametrize("spec, message", [
    (["grp=z"], r"column 'grp' has no group 'z' \(its groups: a, b, c, tiny\)"),
    (["gender=a"], r"'gender' is not a --sensitive column \(sensitive columns: grp\)"),
    (["grp=tiny"], r"that group has \d+ rows, fewer than --min-group-size 30.*lower "
                   r"--min-group-size"),
    (["grp"], r"write COL=VALUE"),
    (["grp=a", "grp=b"], r"names column 'grp' twice"),
])
def test_bad_reference_exits_2_and_lists_what_exists(tmp_path, capsys, spec, message):
    path = write(table(2000, {"a": 0.5, "b": 0.5, "c": 0.5, "tiny": 0.5},
                       sizes={"tiny": 0.005}), tmp_path / "p.csv")
    argv = [x for s in spec for x in ("--reference", s)]
    rc = main(["audit", "fairness", "--predictions", str(path), "--sensitive", "grp",
               "--out", str(tmp_path / "o"), "--n-boot", "50", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()


def test_small_group_is_insufficient_data_never_silently_fine(tmp_path, capsys):
    """A fair group of 40 rows: its intervals are wider than the tolerance band, so it is
    listed with n and the smallest detectable gap (= tolerance + half the interval width);
    big fair groups are shown within tolerance; a planted gap in a small group is flagged."""
    df = table(6000, {"a": 0.5, "b": 0.5, "few": 0.5}, sizes={"few": 0.015}, seed=3)
    path = write(df, tmp_path / "p.csv")
    rep = fairness_audit(path, "grp", settings=FAST)
    few = [e for e in rep["by_group"] if e["label"] == "few"][0]
    assert 30 <= few["n"] <= 60 and few["status"] == "insufficient_data"
    listed = [g for g in rep["summary"]["insufficient_data"] if g["label"] == "few"][0]
    assert listed["n"] == few["n"] and "selection_rate" in listed["metrics"]
    d = [d for d in rep["disparities"] if d["reference"] == "overall" and d["label"] == "few"
         and d["metric"] == "selection_rate" and d["kind"] == "difference"][0]
    lo, hi = d["ci_simultaneous"]
    assert d["status"] == "insufficient_data" and hi - lo > 2 * 0.1
    assert listed["detectable_gap"]["selection_rate"] == pytest.approx(0.1 + (hi - lo) / 2)
    big = [e for e in rep["by_group"] if e["label"] in ("a", "b")]
    assert all(e["status"] in ("within_tolerance", "not_flagged") for e in big)
    sel_a = [d for d in rep["disparities"] if d["reference"] == "overall" and d["label"] == "a"
             and d["metric"] == "selection_rate" and d["kind"] == "difference"][0]
    assert sel_a["status"] == "within_tolerance"
    rc = main(["audit", "fairness", "--predictions", str(path), "--sensitive", "grp",
               "--out", str(tmp_path / "o"), "--n-boot", "200"])
    out = capsys.readouterr().out
    assert rc == 0 and "group(s) with insufficient data" in out
    assert f"few (n={few['n']}): " in out and "smallest detectable gap" in out
    planted = table(6000, {"a": 0.5, "b": 0.5, "few": 0.0}, sizes={"few": 0.015}, seed=3)
    rep2 = fairness_audit(write(planted, tmp_path / "q.csv"), "grp", settings=FAST)
    assert [e for e in rep2["by_group"] if e["label"] == "few"][0]["status"] == "flagged"


def test_compare_is_error_controlled(tmp_path):
    """Two fair models on the same rows (24 groups): no group's change is significant with
    simultaneous intervals; with marginal ones some are, by chance."""
    rng = np.random.default_rng(8)
    n = 24 * 150
    cols = {c: rng.choice([f"{c}{i}" for i in range(k)], n) for c, k in
            (("x", 2), ("u", 3), ("w", 4))}
    y = rng.random(n) < 0.5

    def model(seed):
        r = np.random.default_rng(seed)
        pred = np.where(r.random(n) < 0.75, y, ~y)
        return pd.DataFrame({"example_id": np.arange(n), "y_true": np.where(y, "p", "q"),
                             "y_pred": np.where(pred, "p", "q"), **cols})

    a, b = write(model(1), tmp_path / "a.csv"), write(model(2), tmp_path / "b.csv")
    sim = fairness_audit(a, "x,u,w", settings=FAST, compare=b)["comparison"]
    none = fairness_audit(a, "x,u,w", settings=FairnessSettings(n_boot=200, error_control="none"),
                          compare=b)["comparison"]
    count = (lambda c: sum(m["significant"] for e in c["by_group"]
                           for m in e["metrics"].values()))
    assert count(sim) == 0 and count(none) > 0
    assert sim["error_control"]["critical_value"] > 3


def test_mitigation_before_after_is_error_controlled(tmp_path):
    """Retraining that changes nothing systematic (two fair models, 24 groups): no group's
    change is significant with simultaneous intervals, some are with marginal ones; the
    gaps' simultaneous intervals contain their values and are never narrower than the
    marginal ones' upper ends."""
    rng = np.random.default_rng(9)
    n = 24 * 150
    cols = {c: rng.choice([f"{c}{i}" for i in range(k)], n) for c, k in
            (("x", 2), ("u", 3), ("w", 4))}
    y = rng.random(n) < 0.5

    def model(seed):
        r = np.random.default_rng(seed)
        pred = np.where(r.random(n) < 0.75, y, ~y)
        return pd.DataFrame({"example_id": np.arange(n), "y_true": np.where(y, "p", "q"),
                             "y_pred": np.where(pred, "p", "q"), **cols})

    a, b = write(model(3), tmp_path / "a.csv"), write(model(4), tmp_path / "b.csv")
    counts = {}
    for mode in ("simultaneous", "none"):
        rep = fairness_audit(a, "x,u,w", unmitigated=b, settings=FairnessSettings(
            n_boot=200, error_control=mode))
        m = rep["mitigation"][0]
        counts[mode] = sum(v["change"]["significant"] for g in m["by_group"]
                           for v in g["metrics"].values())
        for gap in m["disparities"].values():
            for side in ("before", "after"):
                lo, hi = gap[side]["ci_simultaneous"]
                assert lo <= gap[side]["value"] <= hi and hi >= gap[side]["ci"][1]
        assert m["error_control"]["family_size"] > 500
    assert counts["simultaneous"] == 0 and counts["none"] > 0
