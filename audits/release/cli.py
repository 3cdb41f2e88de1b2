"""Options and handlers of ``safelm release`` and ``safelm verify``.

``safelm --help`` imports this module, so it imports nothing heavy at module level; the
handlers import the release machinery (and through it torch and Opacus) when they run.
"""

from __future__ import annotations

import argparse

RELEASE_DESCRIPTION = (
    "Package RUN_DIR as a release in --out: the weights, config, tokenizer and privacy ledger, "
    "release.json (the manifest: model, data fingerprint, privacy claim recomputed with a "
    "fresh accountant, audit summaries, metrics, versions, seeds, sha256 of every file), "
    "MODEL_CARD.md/.html and release.sha256. Never copies resume/, canaries.json or data.")
VERIFY_DESCRIPTION = (
    "Check a release dir: every file's sha256 (no file extra or missing), release.json's "
    "schema, then the policy's gates. Prints one PASS/FAIL line per gate; exit 0 when all "
    "pass, 1 when any fails, 2 on bad usage. Without --policy: integrity, schema, the claimed "
    "epsilon against a fresh accountant, and an attached empirical audit's bound <= the claim.")
POLICY_HELP = (
    "TOML or JSON with any of: require_dp, max_epsilon, max_delta, recompute_epsilon, "
    "require_empirical_audit, empirical_le_claimed, require_fairness_audit, "
    "max_flagged_disparities, max_abs_difference, min_ratio (see audits/release/policy.py)")


def add_release_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run dir (central or federated)")
    p.add_argument("--out", required=True, help="release dir to create (must not exist or be "
                   "empty; built under a temporary name and renamed into place)")
    p.add_argument("--fairness-report", help="the fairness audit's report.json (or its "
                   "report.html / folder); summarized in the release")
    p.add_argument("--privacy-audit", help="the privacy audit's report.json (or its folder); "
                   "its empirical epsilon and attacks are summarized in the release")
    p.add_argument("--name", help="release name (default: the run dir's name)")
    p.add_argument("--intended-use", help="what the model is for (default: per task)")
    p.add_argument("--out-of-scope", action="append", default=[], metavar="TEXT",
                   help="a use the model is not for (repeatable)")
    p.add_argument("--limitation", action="append", default=[], metavar="TEXT",
                   help="a known limitation (repeatable)")
    p.add_argument("--data-description", help="what the training data is (never copied)")


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.description = VERIFY_DESCRIPTION
    p.add_argument("release_dir", help="a dir made by 'safelm release'")
    p.add_argument("--policy", help=POLICY_HELP)


def run_release(args: argparse.Namespace) -> int:
    from .build import ReleaseOptions, release
    m = release(args.run_dir, args.out, ReleaseOptions(
        name=args.name, intended_use=args.intended_use, out_of_scope=args.out_of_scope,
        limitations=args.limitation, data_description=args.data_description,
        fairness_report=args.fairness_report, privacy_audit=args.privacy_audit))
    p = m["privacy"]
    again = p["recomputed_epsilon"]
    claim = (f"epsilon {p['epsilon']:.4g} (recomputed "
             f"{'n/a' if again is None else format(again, '.4g')}), delta {p['delta']:g}"
             if p["enabled"] and p["epsilon"] is not None else "no DP guarantee")
    print(f"released {len(m['files']) + 2} files to {args.out}: {claim}")
    print(f"model card: {args.out}/MODEL_CARD.md; check it with 'safelm verify {args.out}'")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from .policy import load_policy
    from .verify import report, verify_release
    policy = load_policy(args.policy)  # a bad policy is a usage error (exit 2) before checks
    lines, status = report(verify_release(args.release_dir, policy))
    print("\n".join(lines))
    return status
