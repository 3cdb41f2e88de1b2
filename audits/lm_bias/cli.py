"""``safelm audit lm-bias RUN_DIR --out DIR``: options and handler (argparse-only imports)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Probe a language-model run for demographic bias: counterfactual "
                     "template pairs scored by log-likelihood, and the sentiment of "
                     "continuations of group-specific prompts.")
    p.add_argument("run_dir", help="a run trained with --task lm")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the report files")
    p.add_argument("--probes", metavar="FILE.json", help="your own probe set (default: the "
                   "bundled set; format in audits/probes/__init__.py)")
    p.add_argument("--classifier", metavar="RUN_DIR", help="also score generations with this "
                   "sentiment classifier run (P(positive) of the continuation alone); train "
                   "it on labels free of group bias, or it adds its own bias to the verdict")
    p.add_argument("--samples", type=int, default=6, help="continuations per prompt "
                   "(default 6; 0 skips the generation probe)")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--confidence", "--ci", dest="confidence", type=float, default=0.95,
                   help="interval level (default 0.95); --ci is a deprecated alias, removed "
                   "in the next release")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance-nats", type=float, default=0.25,
                   help="flag a counterfactual gap whose simultaneous interval lies beyond this "
                   "(default 0.25)")
    p.add_argument("--tolerance-score", type=float, default=0.1,
                   help="flag a generation score gap whose simultaneous interval lies beyond this "
                   "(default 0.1)")


def run(args: argparse.Namespace) -> int:
    from .audit import LMBiasSettings, lm_bias_audit
    report = lm_bias_audit(args.run_dir, args.out, probes=args.probes,
                           classifier=args.classifier, settings=LMBiasSettings(
                               samples=args.samples, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k,
                               n_boot=args.n_boot, confidence=args.confidence, seed=args.seed,
                               tolerance_nats=args.tolerance_nats,
                               tolerance_score=args.tolerance_score))
    from .report import method_text
    sm = report["summary"]
    print(f"{sm['n_flagged']} finding(s) flagged, {sm['n_insufficient_data']} with "
          "insufficient data to decide")
    for s in sm["lines"]:
        print(f"  {s}")
    print(method_text(report))
    print(f"report: {report['_paths']['html']}")
    return 0
