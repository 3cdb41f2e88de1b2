"""Bad input (issue point 10): each gives a clear error or the documented handling, through the
Python API and through the command line (exit 2, one 'error:' line, nothing damaged)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from audits.fairness.audit import FairnessSettings
from audits.fairness.pipeline import fairness_audit
from fairness_helpers import random_binary, write
from safelm.cli import main
from safelm.errors import UserError

FAST = FairnessSettings(n_boot=50)


@pytest.fixture
def table(tmp_path):
    return write(random_binary(n=400), tmp_path / "p.csv")


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["audit", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_misspelled_sensitive_column_suggests_the_closest(table, tmp_path, capsys):
    with pytest.raises(UserError, match=r"no sensitive column 'G1' \(did you mean 'g1'\?"):
        fairness_audit(table, "G1", settings=FAST)
    rc, _, err = _cli(capsys, "fairness", "--predictions", str(table), "--sensitive", "g1,gg2",
                      "--out", str(tmp_path / "a"))
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "did you mean 'g2'" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()


def test_group_of_one_is_kept_marked_and_widened(tmp_path):
    df = random_binary(n=400)
    df.loc[0, "g1"] = "lonely"
    rep = fairness_audit(write(df, tmp_path / "p.csv"), "g1", settings=FAST)
    one = [e for e in rep["by_group"] if e["label"] == "lonely"][0]
    assert one["n"] == 1 and one["small"]
    lo, hi = one["metrics"]["accuracy"]["ci"]
    assert hi - lo > 0.8  # Jeffreys: a single row says almost nothing
    assert not any(d["flagged"] for d in rep["disparities"] if d.get("label") == "lonely")
    between = [d for d in rep["disparities"] if d["reference"] == "between_groups"]
    assert all("lonely" not in (d.get("max_group"), d.get("min_group")) for d in between)


def test_empty_group_values_become_unknown(tmp_path):
    df = random_binary(n=400)
    df.loc[:9, "g2"] = np.nan
    rep = fairness_audit(write(df, tmp_path / "p.csv"), "g2", settings=FAST)
    unknown = [e for e in rep["by_group"] if e["label"] == "unknown"][0]
    assert unknown["n"] == 10
    assert any("'g2'" in w and "unknown" in w for w in rep["inputs"]["warnings"])


@pytest.mark.parametrize("col", ["y_true", "y_pred", "score"])
def test_missing_values_are_refused_with_the_row(tmp_path, col):
    df = random_binary(n=50)
    df[col] = df[col].astype(object)
    df.loc[7, col] = np.nan
    with pytest.raises(UserError, match=rf"1 row\(s\) have no {col} \(first: line 9, "
                       r"example_id 'e7'\)"):
        fairness_audit(write(df, tmp_path / "p.csv"), "g1", settings=FAST)


def test_predicted_label_the_truth_never_uses(tmp_path):
    df = random_binary(n=400)
    df.loc[:4, "y_pred"] = "maybe"
    rep = fairness_audit(write(df, tmp_path / "p.csv"), "g2", settings=FAST)
    assert rep["task"] == "multiclass" and "maybe" in rep["labels"]
    assert any("never occur in y_true" in w for w in rep["inputs"]["warnings"])
    # balanced accuracy averages recall over the classes present in y_true only
    ok = df["y_true"] == df["y_pred"]
    expected = ok.groupby(df["y_true"]).mean().mean()
    assert rep["overall"]["metrics"]["balanced_accuracy"]["value"] == pytest.approx(expected)
    assert rep["overall"]["metrics"]["selection_rate_maybe"]["value"] == pytest.approx(5 / 400)


def test_empty_file_and_header_only(tmp_path):
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(UserError, match="the file is empty"):
        fairness_audit(empty, "g1")
    header = tmp_path / "h.csv"
    header.write_text("example_id,y_true,y_pred,g1\n")
    with pytest.raises(UserError, match="header but no rows"):
        fairness_audit(header, "g1")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.drop(columns="y_pred"), r"no column 'y_pred'"),
    (lambda d: d.assign(score=d["score"] + 1), r"probabilities in \[0, 1\]"),
    (lambda d: d.assign(score="high"), r"column 'score' row 2 is 'high', not a number"),
    (lambda d: d.assign(g1=[f"id{i}" for i in range(len(d))]), r"looks like an identifier"),
    (lambda d: d.assign(y_true="", nll=1.0), r"no nll and n_tokens columns|y_true is empty"),
])
def test_malformed_tables(tmp_path, edit, message):
    df = edit(random_binary(n=300))
    if "nll" in df.columns:
        df = df.drop(columns=["nll"])
    with pytest.raises(UserError, match=message):
        fairness_audit(write(df, tmp_path / "p.csv"), "g1", settings=FAST)


def test_bad_pos_label_and_options(table, tmp_path, capsys):
    with pytest.raises(UserError, match=r"--pos-label 'yess' is not a label.*did you mean 'yes'"):
        fairness_audit(table, "g1", pos_label="yess")
    for argv, msg in [(["--n-boot", "3"], "--n-boot 3"), (["--threshold", "tpr=0.1"],
                                                          "METRIC:KIND=VALUE"),
                      (["--mitigate", "demographic_parity"], "--fit-predictions"),
                      (["--mitigate", "fairest"], "choose from")]:
        rc, _, err = _cli(capsys, "fairness", "--predictions", str(table), "--sensitive", "g1",
                          "--out", str(tmp_path / "o"), *argv)
        assert rc == 2 and msg in err and err.count("\n") == 1, err
    rc, _, err = _cli(capsys, "fairness", "--predictions", str(tmp_path / "nope.csv"),
                      "--sensitive", "g1", "--out", str(tmp_path / "o"))
    assert rc == 2 and "no such file" in err


def test_lm_table_with_missing_nll(tmp_path):
    df = pd.DataFrame({"example_id": range(4), "y_true": "", "y_pred": "",
                       "nll": [1.0, None, 2.0, None], "n_tokens": [3, 4, 0, 0], "g": "a"})
    with pytest.raises(UserError, match=r"no nll \(first: line 3"):
        fairness_audit(write(df, tmp_path / "lm.csv"), "g")
    df.loc[1, "nll"] = 1.5  # a row without tokens may lack nll: it carries no weight
    rep = fairness_audit(write(df, tmp_path / "lm.csv"), "g", settings=FAST)
    assert rep["overall"]["metrics"]["perplexity"]["value"] == pytest.approx(
        np.exp((3 * 1.0 + 4 * 1.5) / 7))


def test_compare_needs_the_same_rows(table, tmp_path):
    other = random_binary(n=400, seed=5)
    other["example_id"] = [f"x{i}" for i in range(400)]
    with pytest.raises(UserError, match="share no example_id"):
        fairness_audit(table, "g1", compare=write(other, tmp_path / "o.csv"), settings=FAST)
    mism = random_binary(n=400, seed=5)  # same ids, different truth
    with pytest.raises(UserError, match="not predictions for the same data"):
        fairness_audit(table, "g1", compare=write(mism, tmp_path / "m.csv"), settings=FAST)


def test_failed_audit_leaves_the_previous_report_intact(table, tmp_path):
    out = tmp_path / "audit"
    fairness_audit(table, "g1", out, settings=FAST)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError):
        fairness_audit(table, "g1,nope", out, settings=FAST)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(before) == ["report.html", "report.json", "report.md"]
    json.loads(before["report.json"])
