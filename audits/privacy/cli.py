"""``safelm audit privacy RUN_DIR [--one-run] [--members FILE --non-members FILE] --out DIR``:
options and handler. Import-light (argparse only at module level): ``safelm --help`` imports
this module."""

from __future__ import annotations

import argparse
import sys

from safelm.errors import UserError

EXIT_FAILED = 1  # the one-run audit refuted the run's epsilon; bad input exits 2 (UserError)


def guess_totals(text: str) -> list[int]:
    """``--guesses 100`` or ``--guesses 50,100,200`` (argparse reports a non-integer)."""
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Privacy audit of a run. --one-run: the one-training-run audit (Steinke, "
                     "Nasr, Jagielski 2023) over canaries included by fair coins "
                     "(privacy.canaries=M, privacy.canary_inclusion=bernoulli): a lower bound "
                     "on epsilon at the stated confidence, checked against the run's "
                     "privacy.json; exits 1 if it exceeds the claim. --members/--non-members: "
                     "loss and reference-model (LiRA) attacks with ROC, AUC and TPR at "
                     "1%/0.1% FPR, descriptive only (no bound, no verdict). Canary exposure "
                     "when the run planted canaries.")
    p.add_argument("run_dir", help="the run dir to audit (from 'safelm train')")
    p.add_argument("--one-run", action="store_true",
                   help="the one-run audit over the run's bernoulli canaries (the verdict)")
    p.add_argument("--guesses", type=guess_totals,
                   default=[], metavar="N[,N...]",
                   help="one-run guess totals (half 'in', half 'out'); one value is fixed a "
                   "priori, several are searched with a Bonferroni correction (default: "
                   "10%%, 20%%, 40%%, 100%% of the canaries)")
    p.add_argument("--members", metavar="FILE",
                   help="rows the run trained on (e.g. its training split)")
    p.add_argument("--non-members", metavar="FILE",
                   help="rows from the same population it did not see (e.g. its test split)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the report files")
    p.add_argument("--reference-models", type=int, default=2, metavar="N",
                   help="reference models for the LiRA attack, trained with the run's config "
                   "on halves of the non-members (even; default 2; 0 skips the attack)")
    p.add_argument("--reference-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the reference models' config, e.g. train.epochs=2 "
                   "(repeatable)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="confidence of the intervals and of the epsilon bound (default 0.95)")
    p.add_argument("--claimed-epsilon", type=float, metavar="EPS",
                   help="test this claim instead of privacy.json's epsilon")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--candidates", type=int, default=2000,
                   help="random secrets each canary is ranked among (default 2000)")
    p.add_argument("--min-rows", type=int, default=20,
                   help="fewest rows accepted in each file (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of splits and resamples")
    g = p.add_argument_group("data columns (default: the run's config)")
    text = g.add_mutually_exclusive_group()
    text.add_argument("--text-col", help="column with the text")
    text.add_argument("--text-cols", metavar="A,B,...", help="tabular rows: the text is "
                      "'A: value | B: value' from these columns, in this order")
    g.add_argument("--label-col", help="column with the class label (classifiers)")
    g.add_argument("--id-col", help="column with example ids")


def run(args: argparse.Namespace) -> int:
    from .audit import PrivacySettings, privacy_audit
    overrides = {k: getattr(args, k) for k in ("text_col", "label_col", "id_col")
                 if getattr(args, k) is not None}
    if args.text_col is not None:  # one named text column replaces the run's data.text_cols
        overrides["text_cols"] = []
    if args.text_cols is not None:
        overrides["text_cols"] = [c.strip() for c in args.text_cols.split(",") if c.strip()]
        if not overrides["text_cols"]:
            raise UserError("--text-cols is empty; list the columns, e.g. --text-cols age,job")
    settings = PrivacySettings(reference_models=args.reference_models,
                               reference_settings=args.reference_set,
                               confidence=args.confidence, n_boot=args.n_boot,
                               n_candidates=args.candidates, min_rows=args.min_rows,
                               seed=args.seed, claimed_epsilon=args.claimed_epsilon,
                               one_run=args.one_run, guesses=args.guesses)
    report = privacy_audit(args.run_dir, args.members, args.non_members, args.out,
                           settings=settings, data_overrides=overrides,
                           log=lambda s: print(s, file=sys.stderr))
    from .report import summary_lines
    for s in summary_lines(report)[1:]:
        print(s)
    print(f"report: {report['_paths']['html']}")
    if report["passed"] is False:
        sys.stderr.write(f"privacy audit {report['verdict']}\n")
        return EXIT_FAILED
    print(report["verdict"])
    return 0
