"""The one-training-run privacy audit (Steinke, Nasr and Jagielski, "Privacy Auditing with One
(1) Training Run", NeurIPS 2023, arXiv 2305.08846).

The game. ``m`` canaries are each included in the training data by an independent fair coin
S_i (``privacy.canary_inclusion=bernoulli``, coins from the OS: ``safelm/canaries.py``). After
training, the auditor scores every canary from the model alone, guesses "in" for the ``k+``
highest scores and "out" for the ``k-`` lowest, and abstains on the rest. If training is
(eps, delta)-DP with respect to each canary, the number of correct guesses ``v`` out of
``r = k+ + k-`` is, up to a delta term, stochastically dominated by Binomial(r, e^eps /
(1 + e^eps)) (their Theorem 5.2 / Algorithm 2):

    P[W >= v] <= P[Binomial(r, q) >= v] + 2 m delta max_{1<=i<=v} P[v-i <= Binomial(r, q) < v] / i,
    q = e^eps / (1 + e^eps).

``p_value`` computes the right side; ``epsilon_lower_bound`` the largest eps whose p-value is
below 1 - confidence (bisection, as in their appendix D). What it assumes: the coins are
independent fair coins unknown to training code other than through the data; the scores
depend on the trained model and the canary strings only (not on the coins); the guess counts
are fixed before looking at the coins. Unlike the members/non-members comparison, nothing is
assumed about independence between rows: the one model, shared by all canaries, is exactly
what the theorem covers.

Choosing k+ and k-. A single pair fixed in advance needs no correction. Searching a grid of G
pairs and keeping the best is G chances; each pair is therefore tested at p / G (Bonferroni), so
the maximum holds at the stated confidence. Both are offered; the report says which was used.

Written by hand because neither Opacus nor any installed library provides this bound; the
reference code of the paper is a few lines, re-derived and vectorized here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import binom

DEFAULT_GRID = (0.1, 0.2, 0.4, 1.0)  # fractions of m guessed (half "in", half "out")


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of >= ``v`` correct of ``r`` guesses among ``m`` canaries under the null
    hypothesis that training is (eps, delta)-DP per canary (Steinke et al. 2023, Thm 5.2)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta > 0:
        # sums[i-1] = P[v - i <= Binomial(r, q) < v], i = 1..v
        sums = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = float(np.max(sums / np.arange(1, v + 1)))
        beta += alpha * delta * 2 * m
    return min(beta, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float,
                        iters: int = 40) -> float:
    """The largest eps the observation (v correct of r) rejects at level ``p``: with
    probability >= 1 - p over the coins, training is not (eps', delta)-DP for any eps' below
    it. 0 when nothing is rejected."""
    if not 0 < p < 1:
        raise ValueError(f"p={p} must be in (0, 1)")
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # every eps rejected: only possible with v == r and r huge
            return lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


def grid_pairs(m: int, guesses: list[int] | None = None) -> list[tuple[int, int]]:
    """(k+, k-) pairs: each total ``r`` split in half ("in" gets the odd one). Default: the
    fractions ``DEFAULT_GRID`` of ``m``. Duplicates and pairs beyond ``m`` are dropped."""
    totals = guesses if guesses else [max(2, round(f * m)) for f in DEFAULT_GRID]
    out: list[tuple[int, int]] = []
    for r in totals:
        r = min(int(r), m)
        pair = ((r + 1) // 2, r // 2)
        if r >= 1 and pair not in out:
            out.append(pair)
    return out


def count_correct(scores: np.ndarray, included: np.ndarray, k_pos: int, k_neg: int
                  ) -> tuple[int, int]:
    """(guesses, correct) for "in" on the k+ highest scores, "out" on the k- lowest. Ties are
    broken by canary index, which is fixed before the coins, so it cannot peek at them."""
    scores, included = np.asarray(scores, float), np.asarray(included, bool)
    order = np.argsort(-scores, kind="stable")
    top, bottom = order[:k_pos], order[len(order) - k_neg:] if k_neg else order[:0]
    return k_pos + k_neg, int(included[top].sum() + (~included[bottom]).sum())


def one_run_bound(scores: np.ndarray, included: np.ndarray, *, delta: float,
                  confidence: float = 0.95, guesses: list[int] | None = None
                  ) -> dict[str, Any]:
    """The audit's result: the best bound over the (k+, k-) pairs, each tested at
    (1 - confidence) / G so that the reported maximum holds at ``confidence``.

    ``guesses`` (totals r) given with one value is a choice made a priori (G = 1)."""
    scores, included = np.asarray(scores, float), np.asarray(included, bool)
    m = len(scores)
    if m < 2 or not np.all(np.isfinite(scores)):
        raise ValueError("need >= 2 canaries with finite scores")
    pairs = grid_pairs(m, guesses)
    p = (1 - confidence) / len(pairs)
    rows = []
    for k_pos, k_neg in pairs:
        r, v = count_correct(scores, included, k_pos, k_neg)
        rows.append({"k_pos": k_pos, "k_neg": k_neg, "guesses": r, "correct": v,
                     "epsilon_lower_bound": epsilon_lower_bound(m, r, v, delta, p)})
    best = max(rows, key=lambda x: x["epsilon_lower_bound"])
    return {"epsilon_lower_bound": best["epsilon_lower_bound"], "confidence": confidence,
            "m": m, "guesses": best["guesses"], "correct": best["correct"], "delta": delta,
            "k_pos": best["k_pos"], "k_neg": best["k_neg"],
            "n_included": int(included.sum()),
            "selection": ("fixed a priori" if len(pairs) == 1 else
                          f"best of {len(pairs)} (k+, k-) pairs, each at p = "
                          f"{p:.4g} (Bonferroni)"),
            "grid": rows}
