"""How good is ``safelm.preflight``'s estimate of a training step's peak memory?

Each configuration runs two training steps (forward, backward, AdamW) of the Transformer in a
fresh process and measures the most memory allocated at once (``preflight.peak_allocated``);
the script prints estimate / measured per configuration and a summary per group (plain / DP,
attention scores kept or not). Two grids: small shapes (what ``--fit`` fits the coefficients
on) and larger ones (held out: what the estimate is judged by).

    .venv/bin/python benchmarks/bench_memory.py                # held-out grid (~12 min)
    .venv/bin/python benchmarks/bench_memory.py --modes hooks --n 8 --seed 4  # Opacus hooks
    .venv/bin/python benchmarks/bench_memory.py --fit --n 160  # refit on the small grid

``--fit`` prints the ``COEFFICIENTS`` table to paste into safelm/preflight.py (non-negative
least squares on relative error). The last line is JSON: per group, the ratio's min, median
and max, and the share of configurations the check would wrongly refuse at their measured
peak (estimate > 1.25 x measured) or wrongly let through (estimate < 0.8 x measured).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(L=[1, 2, 3], d=[64, 128, 192], H=[2, 4, 8], T=[32, 96, 160], V=[256, 1024, 3000],
             B=[4, 12, 24])
LARGE = dict(L=[2, 4], d=[256, 384], H=[4, 8], T=[256, 512, 1024], V=[512, 8000], B=[4, 8])
# Also judged: a model whose state outweighs its activations (GPT-2's vocabulary, tied head)
BIG_STATE = [dict(L=2, d=768, H=12, T=32, V=50257, B=2, task="lm", mode=m, drop=0.1)
             for m in ("plain", "bk")]


def worker(a: dict) -> dict:
    """Peak allocated bytes of two training steps of configuration ``a`` (this process)."""
    import warnings

    import torch
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    from safelm.preflight import count_parameters, peak_allocated
    from safelm.privacy import DifferentialPrivacy
    from safelm.trainer import batch_loss
    from safelm.model import build_model
    cfg = config(a)
    B, T, lm = a["B"], a["T"], a["task"] == "lm"
    with peak_allocated() as peak:
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.train.task)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        n = 2 * B
        x = torch.randint(0, a["V"], (n, T))
        y = x if lm else torch.zeros(n, 0, dtype=torch.long)
        labels = torch.full((n,), -1) if lm else torch.randint(0, 3, (n,))
        lengths = torch.full((n,), T)
        if a["mode"] != "plain":
            loader = torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(x, y, lengths, labels), batch_size=B)
            dp = DifferentialPrivacy(cfg.privacy, n_units=n, batch_size=B)
            model, opt, _ = dp.make_private(model, opt, loader)
        for i in range(2):
            s = slice(i * B, (i + 1) * B)
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(model, (x[s], y[s], lengths[s], labels[s]), cfg.train.task)[0]
            loss.backward()
            opt.step()
    return {**a, "P": count_parameters(cfg)[0], "peak": peak.bytes}


def config(a: dict):
    from safelm.config import Config
    cfg = Config()
    m = cfg.model
    m.n_layer, m.d_model, m.n_head = a["L"], a["d"], a["H"]
    m.block_size, m.vocab_size = a["T"], a["V"]
    m.num_classes, m.dropout = 3, a["drop"]
    cfg.train.task, cfg.train.batch_size = a["task"], a["B"]
    if a["mode"] != "plain":
        p = cfg.privacy
        p.enabled, p.noise_multiplier, p.grad_sample_mode = True, 1.0, a["mode"]
        p.max_physical_batch_size = a["B"]  # the estimate for exactly this batch
    return cfg


def features(r: dict) -> list[float]:
    B, L, d, H, T, V = r["B"], r["L"], r["d"], r["H"], r["T"], r["V"]
    return [1.0, r["P"], B * L * T * d, B * L * H * T * T, B * T * V * (r["task"] == "lm"),
            B * T * d]


def grid(space: dict, n: int, seed: int, modes: list[str]) -> list[dict]:
    keys = list(space)
    cells = [dict(zip(keys, v)) for v in itertools.product(*space.values())]
    rnd = random.Random(seed)
    rnd.shuffle(cells)
    out = []
    for i, c in enumerate(cells[:n]):
        out.append({**c, "task": ["lm", "classify"][i % 2], "mode": modes[(i // 2) % len(modes)],
                    "drop": [0.1, 0.0][(i // (2 * len(modes))) % 2]})
    return out


def measure(configs: list[dict]) -> list[dict]:
    rows = []
    for a in configs:
        r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(a)], cwd=ROOT,
                           capture_output=True, text=True)
        if r.returncode:
            print(f"failed: {a}: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def group(r: dict) -> tuple[str, bool]:
    """(plain | bk | the Opacus mode, attention keeps its scores)."""
    return (r["mode"], r["drop"] > 0)


def fit(rows: list[dict]) -> dict:
    """Coefficients per group by non-negative least squares on relative error. The state
    term (``preflight.state_bytes``: weights, gradients, AdamW's moments) is not fitted but
    subtracted first: the small grid cannot separate it from the activations, and a fitted
    value would not extrapolate to big models."""
    import numpy as np
    from scipy.optimize import nnls

    from safelm.preflight import state_bytes
    coef = {}
    for key in sorted({group(r) for r in rows if r["mode"] in ("plain", "bk")}):
        rs = [r for r in rows if group(r) == key]
        X = np.array([features(r) for r in rs])
        peak = np.array([r["peak"] for r in rs], dtype=float)
        y = peak - np.array([state_bytes(config(r)) for r in rs])
        X = np.delete(X, 1, axis=1)
        if not key[1]:
            X[:, 2] = 0.0  # no score matrices kept: no T^2 term
        w = 1 / peak
        c, _ = nnls(X * w[:, None], y * w)
        coef[key] = tuple(float(f"{v:.4g}") for v in c)
    return coef


def judge(rows: list[dict]) -> dict:
    import numpy as np
    import torch

    from safelm.preflight import estimate
    out: dict = {}
    for r in rows:
        est = estimate(config(r), torch.device("cpu")).total
        r["ratio"] = est / r["peak"]
        g = f"{group(r)[0]}, {'dropout' if group(r)[1] else 'no dropout'}"
        out.setdefault(g, []).append(r["ratio"])
        print(f"{r['mode']:6} {r['task']:8} L{r['L']} d{r['d']} H{r['H']} T{r['T']} V{r['V']} "
              f"B{r['B']} drop {r['drop']}: measured {r['peak'] / 1e6:8.1f} MB, estimate / "
              f"measured {r['ratio']:.2f}")
    summary = {}
    for g, v in out.items():
        v = np.array(v)
        summary[g] = {"n": len(v), "min": round(float(v.min()), 3),
                      "median": round(float(np.median(v)), 3), "max": round(float(v.max()), 3),
                      "over_1.25": round(float((v > 1.25).mean()), 3),
                      "under_0.8": round(float((v < 0.8).mean()), 3)}
        print(f"{g}: n {len(v)}, estimate / measured min {v.min():.2f}, median "
              f"{np.median(v):.2f}, max {v.max():.2f}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--fit", action="store_true", help="fit the coefficients on the small grid")
    ap.add_argument("--n", type=int, default=0, help="configurations (default 160 fit, 24 judge)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--modes", default="plain,bk")
    ap.add_argument("--rows", help="measurements saved from an earlier run's stderr (JSON "
                    "lines): fit or judge them instead of measuring again")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    modes = args.modes.split(",")
    if args.fit:
        rows = [json.loads(x) for x in Path(args.rows).read_text().splitlines()
                if x.startswith("{")] if args.rows else \
            measure(grid(SMALL, args.n or 160, args.seed, modes))
        for key, c in fit(rows).items():
            print(f"    {key}: {c},")
        return
    rows = [json.loads(x) for x in Path(args.rows).read_text().splitlines()
            if x.startswith("{")] if args.rows else \
        measure(grid(LARGE, args.n or 24, args.seed, modes)
                + [c for c in BIG_STATE if c["mode"] in modes])
    print(json.dumps(judge(rows)))


if __name__ == "__main__":
    main()
