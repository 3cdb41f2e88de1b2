"""Accuracy of the bundled sentiment classifier without DP and with DP at epsilon 1, 3, 8.

Same data (bias-free bundled sentiment corpus, split by user), same model, same schedule and
seed for every row; only ``privacy.*`` changes (delta 1e-5, clip 5.0, PRV accountant, Poisson
sampling, noise calibrated to the target for the whole schedule).

Usage: python benchmarks/dp_utility.py [--n 20000] [--epochs 6] [--out DIR]
Last line: {"non_private": {"test_accuracy": ...}, "eps_1": {...}, "eps_3": {...}, "eps_8": {...}}
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from safelm import Config, train_run
from safelm.corpus import write_sentiment_csv

SETTINGS = ["train.task=classify", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
            "model.block_size=32", "train.batch_size=512", "train.lr=2e-2",
            "train.warmup_steps=5", "train.progress=off", "data.user_col=user",
            # The clip near the median per-sample gradient norm (about 6 at initialization):
            # far below it every sample is clipped, DP-SGD turns into normalized SGD that
            # ignores how wrong each prediction is, and the logits grow overconfident.
            "privacy.max_grad_norm=5.0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="rows of the bundled corpus")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--eps", default="1,3,8")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temp dir)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="dp-utility-"))
    out.mkdir(parents=True, exist_ok=True)
    data = out / "sentiment.csv"
    write_sentiment_csv(data, n=args.n, bias=0.0)
    base = SETTINGS + [f"train.epochs={args.epochs}"]
    rows: dict[str, dict] = {}
    for eps in [None] + [float(e) for e in args.eps.split(",")]:
        name = "non_private" if eps is None else f"eps_{eps:g}"
        extra = [] if eps is None else ["privacy.enabled=true", f"privacy.target_epsilon={eps}"]
        t0 = time.perf_counter()
        final = train_run(data, Config.load(None, base + extra), out / name)
        rows[name] = {"test_accuracy": round(final["test_accuracy"], 4),
                      "test_macro_f1": round(final["test_macro_f1"], 4),
                      "epsilon": round(final["epsilon"], 3) if "epsilon" in final else None,
                      "seconds": round(time.perf_counter() - t0, 1)}
        if eps is not None:
            ledger = json.loads((out / name / "privacy.json").read_text())
            rows[name]["noise_multiplier"] = round(ledger["noise_multiplier"], 3)
        print(f"{name:12s} test accuracy {rows[name]['test_accuracy']:.3f}  "
              f"macro-F1 {rows[name]['test_macro_f1']:.3f}  epsilon {rows[name]['epsilon']}",
              flush=True)
    print(f"runs in {out}; {args.n} rows, {args.epochs} epochs, batch 512, delta 1e-5")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
