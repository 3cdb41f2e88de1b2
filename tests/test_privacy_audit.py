"""Privacy audit: descriptive membership statistics against oracles (sklearn, a known AUC),
canary insertion (both inclusion modes). The one-run bound is in test_privacy_audit_one_run.py.
Training-based checks are in test_privacy_audit_e2e.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

from audits.privacy import stats
from audits.privacy.attacks import phi
from audits.privacy.audit import thin_roc
from safelm.canaries import insert_canaries, make_secrets
from safelm.config import Config
from safelm.errors import ConfigError


# ---- ROC, AUC ------------------------------------------------------------------------------
def _scores(seed: int, n_pos: int = 700, n_neg: int = 500, shift: float = 0.6, ties=False):
    rng = np.random.default_rng(seed)
    s = np.r_[rng.normal(shift, 1, n_pos), rng.normal(0, 1, n_neg)]
    return (s.round(1) if ties else s), np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]


@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_roc_match_sklearn(ties):
    s, m = _scores(1, ties=ties)
    r = stats.roc_summary(s, m, n_boot=0)
    assert r["auc"]["value"] == pytest.approx(roc_auc_score(m, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(m, s, drop_intermediate=False)
    np.testing.assert_allclose(r["roc"]["fpr"], fpr)
    np.testing.assert_allclose(r["roc"]["tpr"], tpr)
    for a in (0.01, 0.001, 0.2):
        assert stats.tpr_at(fpr[None], tpr[None], a)[0] == tpr[fpr <= a].max()


def test_weighted_auc_equals_auc_of_repeated_rows():
    s, m = _scores(2, 60, 40, ties=True)
    w = np.random.default_rng(0).poisson(1.0, size=len(s))
    st = stats.sort_scores(s, m)
    fpr, tpr = stats.roc_points(st, w[None])
    rep = np.repeat(np.arange(len(s)), w)
    assert stats.auc_of(fpr, tpr)[0] == pytest.approx(roc_auc_score(m[rep], s[rep]), abs=1e-12)


def test_bootstrap_interval_covers_truth_and_has_the_right_width():
    s, m = _scores(3, 2000, 2000, shift=0.5)
    r = stats.roc_summary(s, m, n_boot=500, seed=1)
    true_auc = norm.cdf(0.5 / math.sqrt(2))  # P(X_member > X_non-member), both N(., 1)
    lo, hi = r["auc"]["ci"]
    assert lo < true_auc < hi
    # Hanley-McNeil standard error for this AUC and n: the interval should be about +-1.96 se
    a, n = true_auc, 2000
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + (n - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (n * n))
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.25)
    t_lo, t_hi = r["tpr_at_fpr"]["0.01"]["ci"]
    assert t_lo <= r["tpr_at_fpr"]["0.01"]["value"] <= t_hi


def test_thin_roc_keeps_the_curve_shape():
    s, m = _scores(4, 5000, 5000)
    fpr, tpr = stats.roc_points(stats.sort_scores(s, m))
    thin = thin_roc(fpr[0], tpr[0], n=200)
    assert len(thin["fpr"]) <= 202
    assert thin["fpr"][0] == 0 and thin["fpr"][-1] == 1 and thin["tpr"][-1] == 1


def test_phi_is_the_logit_of_the_true_label_probability():
    p = np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(phi(-np.log(p), "classify"), np.log(p / (1 - p)))
    np.testing.assert_allclose(phi(np.array([2.0]), "lm"), [-2.0])


# ---- canaries (safelm side) ---------------------------------------------------------------
def test_secrets_are_deterministic_distinct_and_from_the_space():
    a, b = make_secrets(50, seed=3), make_secrets(50, seed=3)
    assert a == b and len(set(a)) == 50 and a != make_secrets(50, seed=4)
    assert all(len(s.split(" ")) == 6 and s.replace(" ", "").isdigit() for s in a)


def test_insert_canaries_appends_rows_shaped_like_the_split():
    train = pd.DataFrame({"example_id": ["a", "b"], "text": ["x", "y"], "user": ["u1", "u2"],
                          "gender": ["f", "m"]})
    out, rec = insert_canaries(train, 3, 4, seed=0)
    assert len(out) == 2 + 12 and list(out.columns) == list(train.columns)
    extra = out.iloc[2:]
    assert extra["text"].value_counts().tolist() == [4, 4, 4]
    assert set(extra["user"]) == {"canary0", "canary1", "canary2"}
    assert set(extra["gender"]) == {"unknown"}
    assert rec["texts"] == [f"my secret code is {s}" for s in rec["secrets"]]
    assert rec["repeats"] == 4 and rec["space_size"] == 10**6
    json.dumps(rec)  # canaries.json must be plain JSON


@pytest.mark.parametrize("items, msg", [
    (["privacy.canaries=-1"], "privacy.canaries=-1 must be >= 0"),
    (["privacy.canary_repeats=0"], "privacy.canary_repeats=0 must be >= 1"),
    (["privacy.canaries=2", "train.task=classify"], "needs train.task=lm"),
    (["privacy.canary_inclusion=bernoulli"], "needs canaries: set privacy.canaries=M"),
    (["privacy.canaries=2", "privacy.canary_inclusion=coin"], "is not one of"),
])
def test_canary_config_validation(items, msg):
    with pytest.raises(ConfigError, match=msg):
        Config.load(None, items)
    assert Config.load(None, ["privacy.canaries=3"]).privacy.canary_repeats == 10


def test_prepare_inserts_canaries_after_the_tokenizer(tmp_path, lm_txt):
    from conftest import TINY

    from safelm.api import prepare
    cfg = Config.load(None, TINY + ["privacy.canaries=2", "privacy.canary_repeats=3"])
    prep = prepare(lm_txt, cfg)
    plain = prepare(lm_txt, Config.load(None, TINY))
    assert len(prep.splits["train"]) == len(plain.splits["train"]) + 6
    assert prep.canaries["secrets"] == make_secrets(2, cfg.train.seed)
    prep.tokenizer.save(tmp_path / "a.json")
    plain.tokenizer.save(tmp_path / "b.json")  # the tokenizer never saw the canaries
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert len(prep.splits["val"]) == len(plain.splits["val"])  # only the train split grows


def test_bernoulli_inclusion_uses_os_coins_and_records_them():
    train = pd.DataFrame({"example_id": ["a"], "text": ["x"], "user": ["u1"]})
    out, rec = insert_canaries(train, 200, 3, seed=0, inclusion="bernoulli")
    inc = np.array(rec["included"])
    assert rec["inclusion"] == "bernoulli" and rec["randomness"] == "os_entropy"
    assert "seed" not in rec and len(rec["secrets"]) == len(set(rec["secrets"])) == 200
    assert 60 < inc.sum() < 140  # fair coins: P(outside) < 1e-8
    extra = out.iloc[1:]
    assert len(extra) == 3 * inc.sum()  # each included canary is `repeats` rows
    assert set(extra["text"]) == {t for t, i in zip(rec["texts"], inc) if i}
    assert set(extra["user"]) == {f"canary{i}" for i in np.flatnonzero(inc)}
    # nothing derives from train.seed: a second draw differs (secrets and coins)
    _, again = insert_canaries(train, 200, 3, seed=0, inclusion="bernoulli")
    assert again["secrets"] != rec["secrets"] and again["included"] != rec["included"]
    # a resumed run reads them back
    _, back = insert_canaries(train, 200, 3, seed=5, inclusion="bernoulli", previous=rec)
    assert back["secrets"] == rec["secrets"] and back["included"] == rec["included"]
    json.dumps(rec)


def test_default_inclusion_is_unchanged():
    train = pd.DataFrame({"example_id": ["a"], "text": ["x"]})
    _, rec = insert_canaries(train, 3, 2, seed=7)
    assert rec["inclusion"] == "all" and rec["seed"] == 7 and "included" not in rec
    assert rec["secrets"] == make_secrets(3, 7)
