"""One-run privacy audit (Steinke, Nasr, Jagielski 2023) of a small LM: non-private vs DP at
epsilon 1, 4 and 8, on the bundled story corpus.

Each run plants M canaries (``privacy.canaries``) with ``privacy.canary_inclusion=bernoulli``:
each is inserted (``--repeats`` rows) with probability 1/2 by a coin from the OS, so the runs
differ in their canaries and the printed bounds vary from one invocation to the next. The
audit (``safelm audit privacy RUN --one-run``, here through ``privacy_audit``) scores every
canary by its total NLL, searches the default grid of guess counts with a Bonferroni correction
and prints the lower bound on epsilon at 95% confidence with the canary count, next to the
claim it tests: the run's epsilon, or for a canary of k rows under example-level DP the group
claim k x epsilon (delta k e^((k-1) eps) delta). A bound above its claim would be a bug.

Prints human-readable lines, then one JSON object as the last line.
Run: ``PYTHONPATH=. .venv/bin/python benchmarks/privacy_audit_one_run.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from audits.privacy.audit import PrivacySettings, privacy_audit
from safelm.api import train_run
from safelm.config import Config
from safelm.corpus import write_story_text

MODEL = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.block_size=32",
         "model.vocab_size=512", "model.dropout=0.0", "train.progress=off",
         "train.warmup_steps=10", "train.weight_decay=0.0"]


def settings(args: argparse.Namespace, eps: float | None) -> list[str]:
    items = MODEL + [f"train.epochs={args.epochs}", f"train.lr={args.lr}",
                     f"train.batch_size={args.batch_size}", f"privacy.canaries={args.m}",
                     f"privacy.canary_repeats={args.repeats}",
                     "privacy.canary_inclusion=bernoulli"]
    if eps is not None:
        items += ["privacy.enabled=true", f"privacy.target_epsilon={eps}",
                  f"train.lr={args.dp_lr}", "privacy.max_grad_norm=1.0"]
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stories", type=int, default=100, help="stories in the corpus")
    ap.add_argument("--m", type=int, default=200, help="canaries (each in with prob. 1/2)")
    ap.add_argument("--repeats", type=int, default=1, help="rows per included canary")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--dp-lr", type=float, default=1e-2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="fewer epochs and canaries (smoke)")
    args = ap.parse_args()
    if args.quick:
        args.stories, args.m, args.epochs = 100, 100, 3
    torch.set_num_threads(2)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="safelm-onerun-") as tmp:
        data = Path(tmp) / "stories.txt"
        write_story_text(data, n_stories=args.stories)
        for eps in (None, 1.0, 4.0, 8.0):
            name = "non_private" if eps is None else f"dp_eps{eps:g}"
            t0 = time.perf_counter()
            final = train_run(data, Config.load(None, settings(args, eps)), Path(tmp) / name)
            rep = privacy_audit(Path(tmp) / name, log=lambda s: None,
                                settings=PrivacySettings(one_run=True, n_candidates=100))
            o = rep["one_run"]
            results[name] = {
                "epsilon_lower_bound": round(o["epsilon_lower_bound"], 3),
                "claimed_epsilon_per_canary": (round(o["claimed_epsilon"], 3)
                                               if o["claimed_epsilon"] is not None else None),
                "run_epsilon": (round(final["epsilon"], 3) if final.get("epsilon") is not None
                                else None),
                "m": o["m"], "included": o["n_included"], "guesses": o["guesses"],
                "correct": o["correct"], "delta": o["delta"], "passed": rep["passed"],
                "test_loss": round(final.get("test_loss", float("nan")), 3),
                "seconds": round(time.perf_counter() - t0, 1)}
            r = results[name]
            claim = ("none (not DP)" if r["claimed_epsilon_per_canary"] is None else
                     f"{r['claimed_epsilon_per_canary']:g} per canary (run epsilon "
                     f"{r['run_epsilon']:g}, {args.repeats} rows per canary)")
            print(f"{name:12s} one-run bound eps >= {r['epsilon_lower_bound']:.3f} (95%) "
                  f"with m = {r['m']} canaries ({r['included']} in), {r['correct']}/"
                  f"{r['guesses']} guesses correct; claim {claim}; test loss "
                  f"{r['test_loss']}; {r['seconds']} s", flush=True)
    print(json.dumps({"settings": {k: v for k, v in vars(args).items()}, "runs": results}))


if __name__ == "__main__":
    main()
