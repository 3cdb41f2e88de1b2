"""Are the fairness audit's flags calibrated? False flags on fair models, detection of planted gaps.

Null scenarios: predictions independent of the groups (y ~ Bernoulli(0.5), the prediction
right with probability 0.8 in every group), 2 to 48 intersectional groups (columns with 2;
2x3; 2x3x4; 2x4x6 values), every intersectional cell with 30, 150 or 2,000 rows. For each
scenario, the fraction of audits that flag anything at all, with a 95% Clopper-Pearson
interval, under three rules:

* ``sim, t=0``: simultaneous intervals, every tolerance set to zero (a flag = any interval
  that excludes parity). The strictest test of the error control: it must stay <= 5% plus
  Monte-Carlo error (the scenario passes unless the interval's lower end exceeds 5%);
* ``sim, default``: what ``safelm audit fairness`` does (tolerance 0.1, four-fifths rule);
* ``marginal, t=0``: per-comparison intervals (``--error-control none``) with zero
  tolerance, for contrast: without error control almost every audit flags something.

Power scenarios: six groups (2 x 3), five of 2,000 rows and one of 100 to 2,000 rows in which
a gap of 0.05 to 0.20 is planted: in its selection rate (positive predictions turned
negative) or in its TPR (positives missed). Detection = that group is flagged on that
metric (against overall or in a pair), with tolerance 0 and with the default tolerance 0.1
(a gap at or below 0.1 can by design not be flagged there).

The audit core is called in process (``audits.fairness.audit.run_audit`` with
``check=False``: no fairlearn MetricFrame cross-check, which does not change any interval).
n_boot = 200 resamples per audit (the critical value is a 95% quantile of 200 maxima;
Monte-Carlo error in it is part of what the null fractions measure), 200 audits per null
scenario, 60 per power scenario: 7 to 12 minutes on 2 shared cores.
Run: ``.venv/bin/python benchmarks/bench_audit_calibration.py [--quick]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import pandas as pd
from scipy.stats import beta

from audits.fairness.audit import FairnessSettings, run_audit
from audits.fairness.comparisons import flag
from audits.fairness.metrics import Task
from audits.fairness.table import PredTable

TASK = Task("binary", ("0", "1"), "1", False)
LEVELS = {2: (2,), 6: (2, 3), 24: (2, 3, 4), 48: (2, 4, 6)}


def table(levels: tuple[int, ...], sizes: list[int], rng: np.random.Generator,
          plant: tuple[str, float] | None = None) -> PredTable:
    """Cells of the given sizes (cell order of itertools.product); ``plant`` = (metric, gap)
    lowers the selection rate or TPR of cell 0 by ``gap``."""
    cells = list(itertools.product(*[[f"v{i}" for i in range(k)] for k in levels]))
    cols = [f"a{j}" for j in range(len(levels))]
    df = pd.DataFrame(np.repeat(np.array(cells, dtype=object), sizes, axis=0), columns=cols)
    n = len(df)
    y = rng.random(n) < 0.5
    pred = np.where(rng.random(n) < 0.8, y, ~y)
    if plant is not None:
        metric, gap = plant
        first = np.arange(n) < sizes[0]
        if metric == "selection_rate":  # selection rate 0.5 -> 0.5 - gap
            pred &= ~(first & (rng.random(n) < gap / 0.5))
        else:  # TPR 0.8 -> 0.8 - gap (selection rate falls by gap / 2)
            pred &= ~(first & y & (rng.random(n) < gap / 0.8))
    df["y_true"], df["y_pred"] = np.where(y, "1", "0"), np.where(pred, "1", "0")
    df["example_id"] = np.arange(n).astype(str)
    return PredTable(df, None, "", TASK, cols)  # type: ignore[arg-type]


def zero_flag(d: dict, key: str) -> bool:
    """Would the entry be flagged with tolerance 0 (the interval excludes parity)?"""
    if d["threshold"] is None or d.get("small") and d["metric"] not in (
            "accuracy", "selection_rate", "tpr", "fpr"):
        return False
    return flag(d["kind"], d[key], 0.0 if d["kind"] == "difference" else 1.0)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def null_scenario(groups: int, size: int, audits: int, n_boot: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    levels = LEVELS[groups]
    counts = {"sim_t0": 0, "sim_default": 0, "marginal_t0": 0}
    for i in range(audits):
        pt = table(levels, [size] * groups, rng)
        rep = run_audit(pt, FairnessSettings(n_boot=n_boot, seed=i), check=False)
        ds = rep["disparities"]
        counts["sim_t0"] += any(zero_flag(d, "ci_simultaneous") for d in ds)
        counts["sim_default"] += any(d["flagged"] for d in ds)
        counts["marginal_t0"] += any(zero_flag(d, "ci") for d in ds
                                     if d.get("scope") != "range")
    out = {"groups": groups, "cell_rows": size, "audits": audits}
    for k, v in counts.items():
        out[k] = {"rate": v / audits, "ci": clopper_pearson(v, audits)}
    out["pass"] = out["sim_t0"]["ci"][0] <= 0.05 and out["sim_default"]["ci"][0] <= 0.05
    return out


def detected(rep: dict, metric: str, key: str, zero: bool) -> bool:
    name = "demographic_parity" if metric == "selection_rate" else metric
    for d in rep["disparities"]:
        if d["metric"] not in (metric, name) or d.get("scope") == "range":
            continue
        if d["slice"] != "a0*a1" or "v0*v0" not in (d.get("label"), d.get("other_label")):
            continue
        if (zero_flag(d, key) if zero else d["flagged"]):
            return True
    return False


def power_scenario(metric: str, gap: float, size: int, audits: int, n_boot: int,
                   seed: int) -> dict:
    rng = np.random.default_rng(seed)
    hits0 = hits = 0
    for i in range(audits):
        pt = table((2, 3), [size] + [2000] * 5, rng, plant=(metric, gap))
        rep = run_audit(pt, FairnessSettings(n_boot=n_boot, seed=i), check=False)
        hits0 += detected(rep, metric, "ci_simultaneous", True)
        hits += detected(rep, metric, "ci_simultaneous", False)
    return {"metric": metric, "gap": gap, "group_rows": size, "audits": audits,
            "detected_t0": hits0 / audits, "detected_default": hits / audits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audits", type=int, default=200, help="audits per null scenario")
    ap.add_argument("--power-audits", type=int, default=60, help="audits per power scenario")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="a small run (the test's)")
    ap.add_argument("--null", action="append", default=[], metavar="GROUPS:ROWS",
                    help="only these null scenarios (e.g. 48:2000), no power table")
    ap.add_argument("--seed", type=int, default=1000, help="seed of the first null scenario")
    a = ap.parse_args()
    groups, sizes, gaps, psizes = [2, 6, 24, 48], [30, 150, 2000], [0.05, 0.1, 0.15, 0.2], \
        [100, 500, 2000]
    if a.quick:
        a.audits, a.power_audits, a.n_boot = 20, 10, 100
        groups, sizes, gaps, psizes = [2, 24], [30, 150], [0.2], [500]
    scenarios = list(itertools.product(groups, sizes))
    if a.null:
        scenarios = [tuple(int(x) for x in spec.split(":")) for spec in a.null]
        gaps = []
    t0 = time.perf_counter()
    print(f"null: fair predictions; fraction of audits flagging anything (95% Clopper-Pearson),"
          f" n_boot={a.n_boot}, {a.audits} audits per scenario")
    print(f"{'groups':>6} {'rows/cell':>9} | {'sim, t=0':>22} | {'sim, default':>22} | "
          f"{'marginal, t=0':>22} | ok")
    nulls = []
    for i, (g, s) in enumerate(scenarios):
        r = null_scenario(g, s, a.audits, a.n_boot, seed=a.seed + i)
        nulls.append(r)
        cell = (lambda x: f"{x['rate']:.3f} [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}]")
        print(f"{g:>6} {s:>9} | {cell(r['sim_t0']):>22} | {cell(r['sim_default']):>22} | "
              f"{cell(r['marginal_t0']):>22} | {'yes' if r['pass'] else 'NO'}", flush=True)
    if gaps:
        print(f"\npower: one group of n rows among five of 2,000 with a planted gap; "
              f"detection rate, {a.power_audits} audits per scenario (simultaneous intervals)")
        print(f"{'metric':>14} {'gap':>5} {'rows':>5} | {'t=0':>5} | {'default t=0.1':>13}")
    powers = []
    for j, (m, gap, s) in enumerate(itertools.product(["selection_rate", "tpr"], gaps,
                                                         psizes)):
        r = power_scenario(m, gap, s, a.power_audits, a.n_boot, seed=5000 + j)
        powers.append(r)
        print(f"{m:>14} {gap:>5.2f} {s:>5} | {r['detected_t0']:>5.2f} | "
              f"{r['detected_default']:>13.2f}", flush=True)
    elapsed = time.perf_counter() - t0
    ok = all(r["pass"] for r in nulls)
    print(f"\nnull flag rate <= 5% + Monte-Carlo error in every scenario: "
          f"{'yes' if ok else 'NO'}; {elapsed:.0f} s")
    print(json.dumps({"n_boot": a.n_boot, "null": nulls, "power": powers, "null_ok": ok,
                      "seconds": round(elapsed, 1)}))


if __name__ == "__main__":
    main()
