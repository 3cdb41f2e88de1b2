"""The fast bootstrap against a naive row bootstrap, exact theory, and coverage."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ks_2samp

from audits.fairness.bootstrap import Engine, make_atoms
from audits.fairness.metrics import Task, encode, metric_defs, stat_defs, stats_from_rows

BIN = Task("binary", ("no", "yes"), "yes", True)
LM = Task("lm", (), None, False)


def _table(n: int, seed: int, small: int = 12):
    """Binary rows in 3 groups, one of them small (exercises the exact small-atom path)."""
    rng = np.random.default_rng(seed)
    g = np.concatenate([rng.choice([0, 1], n - small, p=[0.7, 0.3]), np.full(small, 2)])
    y = rng.random(n) < np.where(g == 1, 0.3, 0.5)
    s = np.clip(np.where(y, 0.62, 0.38) + rng.normal(0, 0.22, n), 0, 1)
    pred = s > 0.5
    return g, np.where(y, "yes", "no"), np.where(pred, "yes", "no"), s


def _engine(task, g, code, cont, exact_max=64):
    slices = {"g": (np.arange(g.max() + 1), g.max() + 1), "overall": (np.zeros(g.max() + 1,
                                                                               np.int64), 1)}
    return Engine(task, metric_defs(task), g, slices, code, cont, exact_max)


def _naive(task, g, code, cont, n_boot, seed):
    """Resample rows with replacement and recompute every metric from scratch."""
    rng = np.random.default_rng(seed)
    G, n = g.max() + 1, len(g)
    out = {m.name: np.empty((n_boot, G)) for m in metric_defs(task)}
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        stats = stats_from_rows(task, code[idx], cont[idx], g[idx], G)
        for m in metric_defs(task):
            with np.errstate(all="ignore"):
                out[m.name][b] = m.fn(stats)
    return out


@pytest.mark.parametrize("task", ["binary", "lm"])
def test_fast_bootstrap_matches_naive_row_bootstrap(task):
    g, y, p, s = _table(3000, seed=0)
    if task == "binary":
        t = BIN
        code, cont = encode(t, y, p, s)
    else:
        t = LM
        rng = np.random.default_rng(5)
        code, cont = encode(t, y, p, nll=rng.gamma(2, 1, len(g)) * (1 + 0.3 * (g == 1)),
                            n_tokens=rng.integers(1, 30, len(g)))
    fast = _engine(t, g, code, cont).bootstrap(4000, seed=1)["g"][0]
    naive = _naive(t, g, code, cont, 1000, seed=2)
    for m in naive:
        for gi in range(3):
            a, b = fast[m][:, gi], naive[m][:, gi]
            a, b = a[np.isfinite(a)], b[np.isfinite(b)]
            # same distribution within Monte-Carlo error (KS is conservative for the
            # discrete laws of small groups); 21 comparisons, so alpha = 1e-3 each
            assert ks_2samp(a, b).pvalue > 1e-3, (m, gi)
            assert a.std() == pytest.approx(b.std(), rel=0.12, abs=1e-9), (m, gi)
            lo_a, hi_a = np.quantile(a, [0.025, 0.975])
            lo_b, hi_b = np.quantile(b, [0.025, 0.975])
            assert abs(lo_a - lo_b) < 0.5 * b.std() + 1e-9, (m, gi)
            assert abs(hi_a - hi_b) < 0.5 * b.std() + 1e-9, (m, gi)


def test_multinomial_counts_have_the_row_bootstrap_law():
    """Group sizes in the resamples are Binomial(N, n_g / N), exactly as in a row bootstrap."""
    g, y, p, s = _table(2000, seed=3)
    code, cont = encode(BIN, y, p, s)
    n = _engine(BIN, g, code, cont).bootstrap(5000, seed=4)["g"][0]["n"]
    share = np.bincount(g) / len(g)
    assert n.mean(0) == pytest.approx(len(g) * share, rel=0.01)
    assert n.std(0) == pytest.approx(np.sqrt(len(g) * share * (1 - share)), rel=0.05)
    assert (n.sum(1) == len(g)).all()


def test_exact_and_normal_paths_for_continuous_sums_agree():
    g, y, p, s = _table(3000, seed=6)
    code, cont = encode(BIN, y, p, s)
    exact = _engine(BIN, g, code, cont, exact_max=10**9).bootstrap(3000, 7)["g"][0]
    normal = _engine(BIN, g, code, cont, exact_max=0).bootstrap(3000, 8)["g"][0]
    for gi in range(3):
        a, b = exact["calibration_error"][:, gi], normal["calibration_error"][:, gi]
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        assert np.quantile(a, 0.5) == pytest.approx(np.quantile(b, 0.5), abs=0.15 * a.std())
        assert b.std() == pytest.approx(a.std(), rel=0.1)


def test_small_atoms_are_resampled_exactly():
    """An atom of one row contributes exactly k times its value when drawn k times."""
    cell = np.array([0, 0, 0, 1])
    code = np.zeros(4, np.int64)
    cont = np.array([[0.1], [0.2], [0.3], [0.7]])
    atoms = make_atoms(cell, code, cont, exact_max=2)
    assert atoms.exact.tolist() == [False, True]
    from audits.fairness.bootstrap import resample
    counts, sums = next(resample(atoms, 200, np.random.default_rng(0), 200))
    assert np.allclose(sums[:, 1, 0], 0.7 * counts[:, 1])
    assert np.allclose(sums[:, 0, 0].mean() / counts[:, 0].mean(), 0.2, atol=0.02)


def test_interval_covers_the_true_rate():
    """95% intervals of a group's selection rate cover the true rate ~95% of the time."""
    rng = np.random.default_rng(9)
    hits, trials = 0, 200
    for _ in range(trials):
        n = 400
        g = rng.choice([0, 1], n, p=[0.75, 0.25])
        pred = rng.random(n) < np.where(g == 1, 0.3, 0.6)
        y = rng.random(n) < 0.5
        code, cont = encode(Task("binary", ("no", "yes"), "yes", False),
                            np.where(y, "yes", "no"), np.where(pred, "yes", "no"))
        eng = _engine(Task("binary", ("no", "yes"), "yes", False), g, code, cont)
        r = eng.bootstrap(400, int(rng.integers(1 << 30)))["g"][0]["selection_rate"][:, 1]
        lo, hi = np.nanquantile(r, [0.025, 0.975])
        hits += lo <= 0.3 <= hi
    assert 0.89 <= hits / trials <= 0.99


def test_paired_views_cancel_shared_variation():
    g, y, p, s = _table(2000, seed=11)
    c0, x0 = encode(BIN, y, p, s)
    eng = _engine(BIN, g, np.stack([c0, c0], 1), np.concatenate([x0, x0], 1))
    r = eng.bootstrap(300, 1)["g"]
    for m in ("accuracy", "tpr", "calibration_error"):
        assert np.allclose(r[0][m], r[1][m], equal_nan=True)  # same rows in both views


def test_stats_layout_counts_every_row_once():
    g, y, p, s = _table(500, seed=12)
    code, cont = encode(BIN, y, p, s)
    st = stats_from_rows(BIN, code, cont, g, 3)
    assert st["cm"].sum() == 500 and st["cal_n"].sum() == 500
    assert [d.name for d in stat_defs(BIN)] == ["cm", "cal_n", "cal_pos", "cal_sum"]
