"""The planted bias of the bundled corpus is flagged; the bias-free variant is not.
Mitigation narrows the gap; the paired comparison finds what changed, and only that."""

from __future__ import annotations

import pytest

from audits.fairness.audit import FairnessSettings
from audits.fairness.pipeline import fairness_audit
from fairness_helpers import simulate, write

SETTINGS = FairnessSettings(n_boot=400)


def _flagged(report, metric, label, kind="ratio"):
    return [d for d in report["disparities"] if d["flagged"] and d["metric"] == metric
            and d.get("label") == label and d["kind"] == kind]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bias")
    return {"biased": write(simulate(0.8), d / "biased.csv"),
            "clean": write(simulate(0.0), d / "clean.csv"),
            "biased_val": write(simulate(0.8, split="val", seed=1), d / "biased_val.csv")}


def test_planted_bias_is_flagged(files):
    rep = fairness_audit(files["biased"], "gender,age_group,region", settings=SETTINGS)
    hit = _flagged(rep, "selection_rate", "female*old")
    assert hit and hit[0]["worse_off"] and hit[0]["ci"][1] < 0.8
    assert _flagged(rep, "tpr", "female*old", "difference")
    dp = [d for d in rep["disparities"] if d["metric"] == "demographic_parity"
          and d["slice"] == "gender*age_group" and d["kind"] == "difference"
          and d["scope"] == "range"][0]
    assert dp["flagged"] and dp["min_group"] == "female*old"
    assert rep["summary"]["flagged"][0].startswith("female*old")
    # groups the bias does not touch are not flagged as worse off on selection rate
    for label in ("male*young", "male*old", "female*young"):
        assert not _flagged(rep, "selection_rate", label)


def test_bias_free_variant_is_not_flagged(files):
    rep = fairness_audit(files["clean"], "gender,age_group,region", settings=SETTINGS)
    assert rep["summary"]["n_flagged"] == 0, rep["summary"]["flagged"]
    sel = [d for d in rep["disparities"] if d["metric"] == "selection_rate"
           and d["label"] == "female*old" and d["kind"] == "ratio"][0]
    assert sel["ci"][0] < 1 < sel["ci"][1] or abs(sel["value"] - 1) < 0.2


def test_threshold_optimizer_narrows_the_gap(files):
    rep = fairness_audit(files["biased"], "gender,age_group", settings=SETTINGS,
                         mitigate=["demographic_parity", "equalized_odds"],
                         fit_predictions=files["biased_val"])
    dp, eo = rep["mitigation"]
    assert dp["constraint"] == "demographic_parity"
    gap = dp["disparities"]["demographic_parity_difference"]
    assert gap["after"]["value"] < 0.5 * gap["before"]["value"]
    assert gap["after"]["ci"][1] < gap["before"]["ci"][0]
    # with every pair of groups in one max-t family, the planted gap is still certain
    assert gap["before"]["ci_simultaneous"][0] > 0.1
    lo, hi = gap["after"]["ci_simultaneous"]
    assert lo <= gap["after"]["value"] <= hi
    odds = eo["disparities"]["equalized_odds_difference"]
    assert odds["after"]["value"] < 0.5 * odds["before"]["value"]
    old_f = [g for g in dp["by_group"] if g["label"] == "female*old"][0]
    sel = old_f["metrics"]["selection_rate"]
    assert sel["after"]["value"] > sel["before"]["value"] + 0.1
    # the accuracy cost is reported with its paired interval, before - after
    acc = dp["overall"]["accuracy"]
    assert dp["accuracy_cost"]["value"] == pytest.approx(acc["before"]["value"]
                                                         - acc["after"]["value"])


def test_compare_finds_the_groups_that_changed(files):
    rep = fairness_audit(files["biased"], "gender,age_group", settings=SETTINGS,
                         compare=files["clean"])
    c = rep["comparison"]
    assert c["rows_joined"] == rep["overall"]["n"]
    by = {e["label"]: e["metrics"]["selection_rate"] for e in c["by_group"]}
    assert by["female*old"]["significant"] and by["female*old"]["ci"][1] < 0
    assert by["female*old"]["change_vs_overall"]["ci"][1] < 0
    # the simulation changes nothing else: other groups' changes are exactly zero
    for label in ("male*young", "male*middle", "female*young"):
        assert by[label]["change"] == 0 and not by[label]["significant"]
