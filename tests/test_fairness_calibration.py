"""The calibration benchmark (issue 12, point 2) in small: fair models are rarely flagged,
planted gaps are found, and without error control fair models are flagged (the control)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_calibration_benchmark_quick():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_audit_calibration.py"),
                           "--quick"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout.strip().splitlines()[-1])
    for r in res["null"]:  # 20 audits each: a tolerant bound on 5%
        assert r["sim_default"]["rate"] <= 0.1, r
        assert r["sim_t0"]["rate"] <= 0.25, r
    assert max(r["marginal_t0"]["rate"] for r in res["null"]) >= 0.8
    for r in res["power"]:  # gap 0.20 in a group of 500 rows
        assert r["detected_t0"] >= 0.8, r
    sel = [r for r in res["power"] if r["metric"] == "selection_rate"][0]
    assert sel["detected_default"] >= 0.8
