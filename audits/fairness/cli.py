"""``safelm audit fairness``: options and handler.

Import-light on purpose (argparse only at module level): ``safelm`` builds its parser, and so
imports this module, for every command, including ``--help``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .audit import Thresholds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Audit a predictions table (from 'safelm predict' or any model) across "
                     "demographic groups and their intersections; writes report.json, "
                     "report.md and a self-contained report.html into --out.")
    p.add_argument("--predictions", required=True, metavar="FILE",
                   help="predictions CSV: example_id, y_true, y_pred, score | score_<class>, "
                   "nll, n_tokens, group columns")
    p.add_argument("--sensitive", required=True, metavar="COL[,COL...]",
                   help="group columns; every column alone and their intersections are audited")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the report files")
    p.add_argument("--pos-label", metavar="LABEL", help="binary tasks: the favourable/positive "
                   "label (default: the second of the sorted labels, matching safelm's score = "
                   "P(labels[1]))")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--confidence", "--ci", dest="confidence", type=float, default=0.95,
                   help="interval level (default 0.95); --ci is a deprecated alias, removed "
                   "in the next release")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--min-group-size", type=int, default=30,
                   help="groups smaller than this are marked small (default 30); never dropped")
    p.add_argument("--bins", type=int, default=10, help="calibration bins (default 10)")
    p.add_argument("--difference-threshold", type=float, default=0.1,
                   help="flag a difference whose interval lies beyond ±this (default 0.1)")
    p.add_argument("--ratio-threshold", type=float, default=0.8,
                   help="flag a selection-rate/perplexity ratio whose interval lies below this "
                   "or above its inverse (default 0.8, the four-fifths rule)")
    p.add_argument("--threshold", action="append", default=[], metavar="METRIC:KIND=VALUE",
                   help="override one tolerance, e.g. tpr:difference=0.05 or "
                   "accuracy:ratio=0.9; VALUE 'none' never flags it (repeatable)")
    p.add_argument("--reference", action="append", default=[], metavar="COL=VALUE",
                   help="compare every group of COL with this reference group (difference "
                   "and ratio; the four-fifths rule then uses its selection rate); "
                   "repeatable, one per column")
    p.add_argument("--error-control", choices=("simultaneous", "none"), default="simultaneous",
                   help="simultaneous (default): flags rest on intervals that hold jointly "
                   "over every comparison of the report (max-t bootstrap); none: on each "
                   "comparison's own interval")
    p.add_argument("--compare", metavar="BASELINE.csv", help="predictions of a baseline run "
                   "(e.g. non-private) on the same rows: per-group change with paired intervals")
    p.add_argument("--mitigate", metavar="CONSTRAINT[,...]", help="fit fairlearn's "
                   "ThresholdOptimizer on --fit-predictions and report before/after: "
                   "demographic_parity, equalized_odds")
    p.add_argument("--fit-predictions", metavar="FILE",
                   help="predictions on other rows (e.g. the val split) to fit --mitigate on")
    p.add_argument("--unmitigated", metavar="FILE", help="the audited predictions come from a "
                   "model trained with an in-training mitigation (e.g. --set "
                   "train.reweight=groups_labels); FILE holds the same model trained without it, "
                   "on the same rows: the report shows before/after and the accuracy cost")
    p.add_argument("--explain", metavar="RUN", help="a classifier run that made the "
                   "predictions: for each flagged group, the words that most drive its "
                   "predictions compared with the rest (integrated gradients; needs --data "
                   "and captum: pip install 'safelm[explain]')")
    p.add_argument("--data", metavar="FILE", help="with --explain: the data file the "
                   "predictions were made from (texts by example_id)")
    p.add_argument("--explain-rows", type=int, default=300, metavar="N",
                   help="with --explain: rows to explain (a seeded sample, topped up to 60 "
                   "per flagged group; default 300)")
    p.add_argument("--mitigation-method", default="", metavar="TEXT",
                   help="how the audited model was mitigated, for the report "
                   "(e.g. 'train.reweight=groups_labels')")


def parse_thresholds(args: argparse.Namespace) -> Thresholds:
    from safelm.errors import UserError

    from .audit import Thresholds
    overrides: dict[tuple[str, str], float | None] = {}
    for spec in args.threshold:
        try:
            key, value = spec.split("=", 1)
            metric, kind = key.split(":", 1)
            if kind not in ("difference", "ratio"):
                raise ValueError
            overrides[(metric.strip(), kind)] = (None if value.strip().lower() == "none"
                                                 else float(value))
        except ValueError:
            raise UserError(f"--threshold {spec!r}: write METRIC:KIND=VALUE with KIND "
                            "difference or ratio, e.g. tpr:difference=0.05") from None
    return Thresholds(args.difference_threshold, args.ratio_threshold, overrides)


def parse_references(specs: list[str]) -> dict[str, str]:
    from safelm.errors import UserError
    out: dict[str, str] = {}
    for spec in specs:
        col, sep, value = spec.partition("=")
        col, value = col.strip(), value.strip()
        if not sep or not col or not value:
            raise UserError(f"--reference {spec!r}: write COL=VALUE, e.g. --reference "
                            "gender=male")
        if col in out:
            raise UserError(f"--reference names column {col!r} twice ({out[col]!r} and "
                            f"{value!r}); give one reference group per column")
        out[col] = value
    return out


def run(args: argparse.Namespace) -> int:
    from .audit import FairnessSettings
    from .pipeline import fairness_audit
    from .report import insufficient_line
    settings = FairnessSettings(n_boot=args.n_boot, confidence=args.confidence, seed=args.seed,
                             min_group_size=args.min_group_size,
                             thresholds=parse_thresholds(args),
                             error_control=args.error_control,
                             references=parse_references(args.reference))
    mitigate = [c.strip() for c in args.mitigate.split(",") if c.strip()] if args.mitigate \
        else None
    from safelm.errors import UserError
    if (args.explain is None) != (args.data is None):
        raise UserError("--explain RUN and --data FILE go together: the run that made the "
                        "predictions and the data file they were made from")
    if args.explain_rows < 1:
        raise UserError("--explain-rows must be at least 1")
    report = fairness_audit(args.predictions, args.sensitive, args.out,
                            pos_label=args.pos_label, settings=settings, n_bins=args.bins,
                            compare=args.compare, mitigate=mitigate,
                            fit_predictions=args.fit_predictions,
                            unmitigated=args.unmitigated,
                            mitigation_method=args.mitigation_method,
                            explain=(args.explain, args.data) if args.explain else None,
                            explain_rows=args.explain_rows)
    lines = report["summary"]["flagged"]
    print(f"{report['summary']['n_flagged']} disparities flagged" if lines
          else "no disparity flagged")
    for s in lines[:8]:
        print(f"  {s}")
    if len(lines) > 8:
        print(f"  ... and {len(lines) - 8} more (see the report)")
    refs = report["settings"]["references"]
    if refs["slices"]:
        ds = [d for d in report["disparities"] if d["reference"] == "group"
              and d["threshold"] is not None]
        where = ", ".join(f"{s}={g}" for s, g in refs["slices"].items())
        print(f"against the reference group ({where}): {sum(d['flagged'] for d in ds)} of "
              f"{len(ds)} comparisons flagged")
    undecided = report["summary"]["insufficient_data"]
    if undecided:
        print(f"{len(undecided)} group(s) with insufficient data (neither flagged nor shown "
              "within tolerance):")
        for g in undecided[:8]:
            print(f"  {insufficient_line(g)}")
        if len(undecided) > 8:
            print(f"  ... and {len(undecided) - 8} more (see the report)")
    for m in report.get("mitigation") or []:
        dp = m["disparities"]["demographic_parity_difference"]
        print(f"  mitigation {m['constraint']}: demographic parity difference "
              f"{dp['before']['value']:.3f} -> {dp['after']['value']:.3f}, accuracy cost "
              f"{m['accuracy_cost']['value']:.3f}")
    if report.get("explanations"):
        from ..explain.groups import lines as explain_lines
        print("what drives the flagged groups' predictions (integrated gradients):")
        for s in explain_lines(report["explanations"]):
            print(f"  {s}")
    print(f"report: {report['_paths']['html']}")
    return 0
