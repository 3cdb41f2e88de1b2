"""Privacy audit: statistics against oracles (scipy, sklearn, mechanisms with a known epsilon),
canary insertion, and bad-input exits. Training-based checks are in test_privacy_audit_e2e.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import beta, binomtest, norm
from sklearn.metrics import roc_auc_score, roc_curve

from audits.privacy import stats
from audits.privacy.attacks import phi
from audits.privacy.audit import thin_roc, verdict
from safelm.canaries import insert_canaries, make_secrets
from safelm.config import Config
from safelm.errors import ConfigError


# ---- Clopper-Pearson, ROC, AUC ----------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 50, 1000])
def test_clopper_pearson_matches_beta_quantiles_and_binomtest(n):
    k = np.arange(n + 1)
    lo, hi = stats.clopper_pearson(k, n, 0.9)
    ref_lo = np.where(k > 0, beta.ppf(0.05, np.maximum(k, 1), n - k + 1), 0.0)
    ref_hi = np.where(k < n, beta.ppf(0.95, k + 1, np.maximum(n - k, 1)), 1.0)
    np.testing.assert_allclose(lo, ref_lo, atol=1e-10)
    np.testing.assert_allclose(hi, ref_hi, atol=1e-10)
    for kk in {0, n // 3, n}:
        ci = binomtest(int(kk), n).proportion_ci(0.9, method="exact")
        assert lo[kk] == pytest.approx(ci.low, abs=1e-9)
        assert hi[kk] == pytest.approx(ci.high, abs=1e-9)


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


# ---- the empirical epsilon lower bound ---------------------------------------------------
def _randomized_response(eps: float, n: int, seed: int):
    """Scores of an eps-DP mechanism: the member bit, kept with probability e^eps/(1+e^eps).
    Its optimal test has TPR/FPR = e^eps exactly, so eps is the true, tight answer."""
    rng = np.random.default_rng(seed)
    keep = math.exp(eps) / (1 + math.exp(eps))
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    out = np.where(rng.random(2 * n) < keep, member, ~member).astype(float)
    return out, member


def test_bound_formula_on_exact_rates():
    # rates measured without error (huge n): both expressions of the DP inequality
    eps, _ = stats.epsilon_bounds(np.array([5e6, 9e6]), 10**7, np.array([1e5, 5e6]), 10**7,
                                  delta=0.0, confidence=0.95)
    assert eps[0] == pytest.approx(math.log(0.5 / 0.01), abs=0.01)  # log(TPR/FPR)
    assert eps[1] == pytest.approx(math.log(0.5 / 0.1), abs=0.01)  # log((1-FPR)/(1-TPR))
    # delta is subtracted from the numerator
    e_d, _ = stats.epsilon_bounds(np.array([5e6]), 10**7, np.array([1e5]), 10**7, delta=0.2,
                                  confidence=0.95)
    assert e_d[0] == pytest.approx(math.log(0.3 / 0.01), abs=0.01)


def test_bound_is_valid_for_randomized_response():
    eps, trials = 1.0, 200
    bounds = [stats.empirical_epsilon(*_randomized_response(eps, 300, s), delta=0.0,
                                      confidence=0.95, seed=s)["value"] for s in range(trials)]
    assert np.mean(np.array(bounds) > eps) <= 0.05  # a 95% lower bound
    assert np.median(bounds) > 0.3  # and not trivially zero


def test_bound_approaches_the_true_epsilon_with_large_n():
    for eps in (0.5, 2.0):
        r = stats.empirical_epsilon(*_randomized_response(eps, 200_000, 7), delta=0.0)
        assert eps - 0.08 < r["value"] <= eps


def test_bound_is_valid_for_the_gaussian_mechanism():
    # members ~ N(mu, 1), non-members ~ N(0, 1): exactly (eps, delta(eps))-DP with
    # delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle & Wang 2018)
    mu, delta = 2.0, 1e-5
    true_eps = next(e for e in np.arange(0, 20, 0.001)
                    if norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2)
                    <= delta)
    rng = np.random.default_rng(0)
    n = 50_000
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    s = np.r_[rng.normal(mu, 1, n), rng.normal(0, 1, n)]
    r = stats.empirical_epsilon(s, member, delta=delta)
    assert 1.0 < r["value"] < true_eps


def test_no_signal_gives_no_bound():
    rng = np.random.default_rng(5)
    member = np.r_[np.ones(3000, bool), np.zeros(3000, bool)]
    r = stats.empirical_epsilon(rng.normal(size=6000), member, delta=1e-5)
    assert r["value"] < 0.2


def test_verdict_fails_only_when_the_bound_exceeds_the_claim():
    dp = {"dp": True}
    assert verdict(dp, 8.0, 1.2, 1e-5)[0]
    ok, line = verdict(dp, 1.0, 1.2, 1e-5)
    assert not ok and line.startswith("FAILED") and "\n" not in line
    assert verdict({"dp": False}, None, 3.0, 1e-5)[0]  # nothing claimed, nothing refuted


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
