"""Bootstrap intervals for a fairness audit: SafeLM's count bootstrap vs fairlearn's n_boot.

Workload (issue 4, point 4; issue 12, point 7): 1,000,000 synthetic binary predictions with
scores, 20 intersectional groups (gender x age x region = 2 x 5 x 2), the audit's 7 metrics.

* fast: ``audits.fairness.bootstrap.Engine`` (multinomial over group-cell counts), n_boot
  resamples of all 20 groups and the overall population, timed in full on the 1M rows.
* fairlearn: ``MetricFrame(..., n_boot, ci_quantiles)`` with the same sklearn-signature metric
  functions. A full run on 1M rows would take hours (it resamples and regroups the 1M rows
  with pandas per resample), so its time per resample is MEASURED on the 1M rows with a few
  resamples and EXTRAPOLATED linearly to n_boot (fairlearn's resamples are independent loop
  iterations, so its cost is linear in n_boot; the printout labels this).
* agreement and an apples-to-apples ratio: both run in full with the same n_boot on a
  random subsample (default 20,000 rows); every group's interval ends are compared, in units
  of the Monte-Carlo standard error of a bootstrap quantile (sqrt(q(1-q)/B) / density, with
  the density from the fast replicates' spread); they agree when every |z| < 4.5.

* full audit: ``run_audit`` (fairlearn MetricFrame values and their cross-check, every slice,
  every comparison to overall and between every pair of groups, simultaneous max-t
  intervals, statuses) on 1,000,000 rows with 3 sensitive columns of 2 x 4 x 6 values (48
  intersectional groups) and 1,000 resamples, timed in full (target < 30 s); reading the
  CSV and writing the report are not part of it.

Prints human-readable lines, then one JSON object of the measured ratios as the last line.
Run: ``.venv/bin/python benchmarks/bench_audit.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame
from scipy.stats import norm

from audits.fairness.bootstrap import Engine
from audits.fairness.metrics import Task, encode, metric_defs, metric_functions

TASK = Task("binary", ("negative", "positive"), "positive", True)
COLS = ["gender", "age", "region"]
QUANTILES = [0.025, 0.975]


def synthetic(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    gender = rng.choice(["f", "m"], n, p=[0.45, 0.55])
    age = rng.choice(["18-25", "26-35", "36-50", "51-65", "65+"], n,
                     p=[0.15, 0.25, 0.3, 0.2, 0.1])
    region = rng.choice(["urban", "rural"], n, p=[0.7, 0.3])
    base = 0.5 - 0.1 * (age == "65+") + 0.05 * (gender == "m")
    y = rng.random(n) < base
    score = np.clip(np.where(y, 0.62, 0.38) - 0.08 * ((gender == "f") & (age == "65+"))
                    + rng.normal(0, 0.2, n), 0, 1)
    return pd.DataFrame({"y_true": np.where(y, "positive", "negative"),
                         "y_pred": np.where(score > 0.5, "positive", "negative"),
                         "score": score, "gender": gender, "age": age, "region": region})


def fast_bootstrap(df: pd.DataFrame, n_boot: int, seed: int = 0
                   ) -> tuple[float, list[tuple[str, ...]], dict[str, np.ndarray]]:
    """Seconds (encode + atoms + resamples + metrics), group keys, replicates [B, G]."""
    t0 = time.perf_counter()
    keys_df = df[COLS].drop_duplicates().sort_values(COLS)
    keys = [tuple(r) for r in keys_df.itertuples(index=False)]
    cell = df.groupby(COLS, sort=True).ngroup().to_numpy()
    code, cont = encode(TASK, df["y_true"].to_numpy(), df["y_pred"].to_numpy(),
                        df["score"].to_numpy())
    g = len(keys)
    eng = Engine(TASK, metric_defs(TASK), cell, {"cell": (np.arange(g), g),
                                                 "overall": (np.zeros(g, np.int64), 1)},
                 code, cont)
    reps = eng.bootstrap(n_boot, seed)["cell"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _ = {m: np.nanquantile(v, QUANTILES, axis=0) for m, v in reps.items()}
    return time.perf_counter() - t0, keys, reps


def full_audit(n: int, n_boot: int) -> tuple[float, int, float]:
    """Seconds of ``run_audit`` on n rows, 2 x 4 x 6 groups; disparities; critical value."""
    from audits.fairness.audit import FairnessSettings, run_audit
    from audits.fairness.table import PredTable
    rng = np.random.default_rng(7)
    df = synthetic(n).drop(columns=COLS)
    df["a"] = rng.choice(["f", "m"], n, p=[0.45, 0.55])
    df["b"] = rng.choice(["18-25", "26-40", "41-65", "65+"], n, p=[0.2, 0.35, 0.3, 0.15])
    df["c"] = rng.choice(["n", "e", "s", "w", "c", "x"], n, p=[0.3, 0.2, 0.2, 0.15, 0.1, 0.05])
    df["example_id"] = np.arange(n).astype(str)
    pt = PredTable(df, None, "", TASK, ["a", "b", "c"])  # type: ignore[arg-type]
    t0 = time.perf_counter()
    rep = run_audit(pt, FairnessSettings(n_boot=n_boot))
    return (time.perf_counter() - t0, len(rep["disparities"]),
            rep["settings"]["error_control"]["critical_value"])


def fairlearn_bootstrap(df: pd.DataFrame, n_boot: int, seed: int = 0
                        ) -> tuple[float, MetricFrame]:
    funcs = metric_functions(TASK)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mf = MetricFrame(metrics=funcs, y_true=df["y_true"].to_numpy(),
                         y_pred=df["y_pred"].to_numpy(), sensitive_features=df[COLS],
                         sample_params={"calibration_error": {"score": df["score"].to_numpy()}},
                         n_boot=n_boot, ci_quantiles=QUANTILES, random_state=seed)
    return time.perf_counter() - t0, mf


def fairlearn_point(df: pd.DataFrame) -> float:
    funcs = metric_functions(TASK)
    t0 = time.perf_counter()
    MetricFrame(metrics=funcs, y_true=df["y_true"].to_numpy(), y_pred=df["y_pred"].to_numpy(),
                sensitive_features=df[COLS],
                sample_params={"calibration_error": {"score": df["score"].to_numpy()}})
    return time.perf_counter() - t0


def agreement(mf: MetricFrame, keys: list[tuple[str, ...]], reps: dict[str, np.ndarray],
              n_fair: int, n_fast: int) -> tuple[float, int]:
    """Max |z| of interval-end differences in Monte-Carlo standard errors, and how many."""
    zs = []
    lo_ci, hi_ci = mf.by_group_ci
    for m in metric_functions(TASK):
        for gi, key in enumerate(keys):
            r = reps[m][:, gi]
            r = r[np.isfinite(r)]
            sd = r.std()
            if sd == 0:
                continue
            for q, frame in zip(QUANTILES, (lo_ci, hi_ci)):
                theirs = float(frame.loc[key, m])
                mine = float(np.quantile(r, q))
                dens = norm.pdf(norm.ppf(q)) / sd
                se = np.sqrt(q * (1 - q) * (1 / n_fair + 1 / n_fast)) / dens
                zs.append(abs(mine - theirs) / se)
    return float(max(zs)), len(zs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--fairlearn-resamples", type=int, default=3,
                    help="resamples timed on the full rows (then extrapolated)")
    ap.add_argument("--sub-rows", type=int, default=20_000)
    ap.add_argument("--sub-boot", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="a smaller run (CI smoke test)")
    a = ap.parse_args()
    if a.quick:
        a.rows, a.n_boot, a.fairlearn_resamples, a.sub_rows, a.sub_boot = (
            200_000, 500, 2, 10_000, 100)
    df = synthetic(a.rows)
    print(f"{a.rows:,} predictions, {df.groupby(COLS).ngroups} intersectional groups, "
          f"{len(metric_functions(TASK))} metrics")

    t_fast, _, _ = fast_bootstrap(df, a.n_boot)
    print(f"fast count bootstrap, n_boot={a.n_boot}: {t_fast:.2f} s (measured)")
    t_point = fairlearn_point(df)
    t_fl, _ = fairlearn_bootstrap(df, a.fairlearn_resamples)
    per = max(t_fl - t_point, 1e-9) / a.fairlearn_resamples
    t_fl_full = t_point + per * a.n_boot
    print(f"fairlearn MetricFrame: {t_point:.2f} s without bootstrap, {per:.2f} s per resample "
          f"(measured with n_boot={a.fairlearn_resamples}); n_boot={a.n_boot} EXTRAPOLATED: "
          f"{t_fl_full:.0f} s")
    ratio = t_fl_full / t_fast
    print(f"speed ratio on {a.rows:,} rows: {ratio:.0f}x (target >= 100x)")
    t_audit, n_disp, c = full_audit(a.rows, a.n_boot)
    print(f"full audit, {a.rows:,} rows, 3 sensitive columns (48 intersectional groups), "
          f"n_boot={a.n_boot}, simultaneous intervals over {n_disp:,} disparities "
          f"(critical value {c:.2f}): {t_audit:.1f} s (measured; target < 30 s)")

    sub = df.sample(n=a.sub_rows, random_state=1).reset_index(drop=True)
    t_fast_sub, keys, _ = fast_bootstrap(sub, a.sub_boot, seed=2)
    t_fl_sub, mf = fairlearn_bootstrap(sub, a.sub_boot, seed=3)
    _, _, reps_big = fast_bootstrap(sub, 8000, seed=4)  # reference law, small MC error
    max_z, n_cmp = agreement(mf, keys, reps_big, a.sub_boot, 8000)
    agree = max_z < 4.5
    print(f"subsample {a.sub_rows:,} rows, n_boot={a.sub_boot} both measured: fast "
          f"{t_fast_sub:.2f} s, fairlearn {t_fl_sub:.1f} s, ratio {t_fl_sub / t_fast_sub:.0f}x")
    print(f"interval ends agree within Monte-Carlo error: max |z| = {max_z:.2f} over {n_cmp} "
          f"ends -> {'yes' if agree else 'NO'}")
    print(json.dumps({
        "full_audit": {"rows": a.rows, "groups": 48, "n_boot": a.n_boot,
                       "seconds": round(t_audit, 2), "disparities": n_disp,
                       "under_30s": t_audit < 30},
        "rows_1m": {"rows": a.rows, "n_boot": a.n_boot, "fast_s": round(t_fast, 3),
                    "fairlearn_s_per_resample": round(per, 3),
                    "fairlearn_s_extrapolated": round(t_fl_full, 1),
                    "time_ratio": round(ratio, 1)},
        "subsample": {"rows": a.sub_rows, "n_boot": a.sub_boot, "fast_s": round(t_fast_sub, 3),
                      "fairlearn_s": round(t_fl_sub, 2),
                      "time_ratio": round(t_fl_sub / t_fast_sub, 1),
                      "max_abs_z": round(max_z, 2), "intervals_agree": agree}}))


if __name__ == "__main__":
    main()
