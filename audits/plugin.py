"""The ``safelm audit`` command and the demo's audit step, plugged into ``safelm`` through
the ``safelm.plugins`` entry point (see ``safelm/plugins.py``).

``safelm audit`` has one sub-command per audit. Adding one (say ``privacy``) is one entry
in :data:`AUDITS`: a name, a help line, a function adding its options to its parser and a
handler returning the exit status. Option modules are imported here, so they import nothing
heavy at module level (``safelm --help`` loads this file); handlers import what they need.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from safelm.errors import UserError

from .embeddings import cli as embeddings_cli
from .explain import cli as explain_cli
from .fairness import cli as fairness_cli
from .lm_bias import cli as lm_bias_cli
from .privacy import cli as privacy_cli
from .release import cli as release_cli

DEMO_ORDER = 10


@dataclass(frozen=True)
class Audit:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


AUDITS: list[Audit] = [
    Audit("fairness", "bias audit of a predictions table: per-group metrics with intervals",
          fairness_cli.add_arguments, fairness_cli.run),
    Audit("lm-bias", "bias probes of a language-model run: counterfactual pairs, generations",
          lm_bias_cli.add_arguments, lm_bias_cli.run),
    Audit("privacy", "privacy audit of a run: the one-run canary bound on epsilon vs the "
          "claim (--one-run); descriptive membership inference", privacy_cli.add_arguments,
          privacy_cli.run),
    Audit("embeddings", "embedding association test (WEAT) of a word-vector file or a run's "
          "input embeddings", embeddings_cli.add_arguments, embeddings_cli.run),
]


def register(subparsers: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``safelm audit <kind>`` for every entry of :data:`AUDITS`, ``safelm release``
    / ``safelm verify`` (audits/release) and ``safelm explain`` (audits/explain)."""
    p = subparsers.add_parser("audit", help="audit predictions or a run (fairness, LM bias, "
                              "privacy, embeddings)",
                              description="Audits: " + ", ".join(a.name for a in AUDITS))
    sub = p.add_subparsers(dest="audit_kind", metavar="AUDIT", parser_class=type(p))
    for a in AUDITS:
        sp = sub.add_parser(a.name, help=a.help)
        a.add_arguments(sp)
        sp.set_defaults(audit_handler=a.handler)
    r = subparsers.add_parser("release", help="package a run as a release: weights, model "
                              "card, manifest with hashes",
                              description=release_cli.RELEASE_DESCRIPTION)
    release_cli.add_release_arguments(r)
    v = subparsers.add_parser("verify", help="check a release's hashes, schema and policy "
                              "gates (exit 1 naming each failed gate)")
    release_cli.add_verify_arguments(v)
    x = subparsers.add_parser("explain", help="per-token attributions of a classifier's "
                              "predictions (integrated gradients, attention) and their "
                              "faithfulness")
    explain_cli.add_arguments(x)
    return {"audit": _dispatch, "release": release_cli.run_release,
            "verify": release_cli.run_verify, "explain": explain_cli.run}


def _dispatch(args: argparse.Namespace) -> int:
    handler = getattr(args, "audit_handler", None)
    if handler is None:
        raise UserError("safelm audit needs one of: " + ", ".join(a.name for a in AUDITS)
                        + "; e.g. 'safelm audit fairness --help'")
    return handler(args)


def _demo_dp(ctx: dict[str, Any], out: Path) -> None:
    """DP x fairness: what DP cost each group, against the non-private classifier."""
    from .fairness.audit import FairnessSettings
    from .fairness.pipeline import fairness_audit
    print("\n[audit] what DP cost each group (DP classifier vs the non-private one)")
    rep = fairness_audit(ctx["dp_predictions"], list(ctx["group_cols"]), out / "audit-dp",
                         settings=FairnessSettings(n_boot=300 if ctx.get("quick") else 1000),
                         compare=ctx["predictions"])
    pairs = [e for e in rep["comparison"]["by_group"] if e["slice"] in ("overall",
                                                                       "gender*age_group")]
    for e in sorted(pairs, key=lambda e: e["metrics"]["accuracy"]["change"])[:4]:
        a = e["metrics"]["accuracy"]
        print(f"    {e['label']}: accuracy {a['baseline']:.3f} -> {a['value']:.3f}, change "
              f"{a['change']:+.3f} [{a['ci'][0]:+.3f}, {a['ci'][1]:+.3f}]")
    ctx["dp_fairness_report"] = rep["_paths"]["html"]
    print(f"  DP x fairness report: {rep['_paths']['html']}")


def _demo_reweighted(ctx: dict[str, Any], out: Path, quick: bool) -> None:
    """In-training mitigation: the reweighted classifier against the plain one, paired."""
    from .fairness.audit import FairnessSettings
    from .fairness.pipeline import fairness_audit
    print(f"\n[audit] in-training mitigation ({ctx['reweight_method']}) against the plain "
          "classifier")
    rep = fairness_audit(ctx["reweighted_predictions"], list(ctx["group_cols"]),
                         out / "audit-reweighted",
                         settings=FairnessSettings(n_boot=300 if quick else 1000),
                         unmitigated=ctx["predictions"], mitigation_method=ctx["reweight_method"])
    m = rep["mitigation"][-1]
    for key, v in m["disparities"].items():
        print(f"    {key.replace('_', ' ')}: {v['before']['value']:.3f} -> "
              f"{v['after']['value']:.3f} {_ci(v['after']['ci'])}")
    cost = m["accuracy_cost"]
    print(f"    accuracy cost {cost['value']:+.3f} {_ci(cost['ci'])} (negative: it gained)")
    print(f"  {rep['summary']['n_flagged']} disparities flagged after mitigation")
    ctx["reweighted_fairness_report"] = rep["_paths"]["html"]
    print(f"  mitigation report: {rep['_paths']['html']}")


def _ci(ci: list[float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def demo_step(ctx: dict[str, Any]) -> None:
    """Audit the demo classifier's test predictions (mitigation fit on its val predictions),
    compare the DP classifier with it when the demo trained one, probe the demo language
    model, audit the DP classifier's privacy, release it and verify the release; print where
    the HTML reports are."""
    from safelm.api import load_run, predictions_table, write_csv

    from .fairness.audit import FairnessSettings
    from .fairness.pipeline import fairness_audit
    from .lm_bias.demo import demo_step as lm_bias_demo

    out = Path(ctx["out"])
    print("\n[audit] fairness of the sentiment classifier (test split)")
    val = out / "predictions_val.csv"
    write_csv(predictions_table(load_run(ctx["classifier_run"]), ctx["data"]["sentiment"],
                                split="val"), val)
    # --quick has too few rows for every intersectional cell to reach the val split, and
    # per-group thresholds need each cell: the quick demo skips mitigation.
    quick = bool(ctx.get("quick"))
    report = fairness_audit(ctx["predictions"], list(ctx["group_cols"]), out / "audit-fairness",
                            settings=FairnessSettings(n_boot=300 if quick else 1000),
                            mitigate=[] if quick else ["demographic_parity", "equalized_odds"],
                            fit_predictions=None if quick else val)
    lines = report["summary"]["flagged"]
    print(f"  {report['summary']['n_flagged']} disparities flagged" if lines
          else "  no disparity flagged")
    for s in lines[:5]:
        print(f"    {s}")
    if report.get("mitigation"):
        dp = report["mitigation"][0]["disparities"]["demographic_parity_difference"]
        print(f"  thresholds (demographic parity): selection-rate gap "
              f"{dp['before']['value']:.3f} -> {dp['after']['value']:.3f}, accuracy cost "
              f"{report['mitigation'][0]['accuracy_cost']['value']:.3f}")
    ctx["fairness_report"] = report["_paths"]["html"]
    print(f"  fairness report: {report['_paths']['html']}")
    if ctx.get("reweighted_predictions"):
        _demo_reweighted(ctx, out, quick)
    if ctx.get("dp_predictions"):
        _demo_dp(ctx, out)
    lm_bias_demo(ctx)  # scored by the lexicon, not by the deliberately biased classifier
    from .privacy.demo import demo_step as privacy_demo
    from .release.demo import demo_step as release_demo
    privacy_demo(ctx)  # membership inference against the DP classifier
    release_demo(ctx)  # its release, verified against a policy, and the index page
