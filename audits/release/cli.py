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
    "MODEL_CARD.md/.html and release.sha256 (signed into release.sha256.sig with --sign). "
    "Attached audit reports must have evaluated these weights (their model_sha256). Never "
    "copies resume/, canaries.json or data.")
VERIFY_DESCRIPTION = (
    "Check a release dir: every file's sha256 (no file extra or missing), release.json's "
    "schema, then the policy's gates. Prints one PASS/FAIL line per gate; exit 0 when all "
    "pass, 1 when any fails, 2 on bad usage. Without --policy: integrity, schema, the claimed "
    "epsilon against a fresh accountant, an attached empirical audit's bound <= the claim, and "
    "attached audits bound to the released weights. With --allowed-signers: the signature "
    "(gate signature), checked by stock 'ssh-keygen -Y verify'.")
POLICY_HELP = (
    "TOML or JSON with any of: require_dp, max_epsilon, max_delta, recompute_epsilon, "
    "require_empirical_audit, empirical_le_claimed, require_fairness_audit, "
    "max_flagged_disparities, max_abs_difference, min_ratio, require_signature, "
    "require_bound_audits (see audits/release/policy.py)")


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
    p.add_argument("--allow-unbound-report", action="store_true", help="attach a report that "
                   "does not record the released weights' sha256 (or records other weights); "
                   "the card then says it is unbound, and verify's audits_bound gate fails")
    p.add_argument("--sign", metavar="KEY", help="OpenSSH private key: sign release.sha256 "
                   "(SSHSIG, namespace safelm-release) into release.sha256.sig, checkable with "
                   "'ssh-keygen -Y verify'; an encrypted key must be loaded in ssh-agent")


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.description = VERIFY_DESCRIPTION
    p.add_argument("release_dir", help="a dir made by 'safelm release'")
    p.add_argument("--policy", help=POLICY_HELP)
    p.add_argument("--allowed-signers", metavar="FILE", help="OpenSSH allowed_signers file: "
                   "release.sha256.sig must verify for a principal listed there (gate "
                   "signature); a missing or bad signature then fails")
    p.add_argument("--identity", help="with --allowed-signers: the principal whose key must "
                   "have signed (default: whichever listed principal's key signed, found with "
                   "'ssh-keygen -Y find-principals')")


def run_release(args: argparse.Namespace) -> int:
    from .build import ReleaseOptions, release
    m = release(args.run_dir, args.out, ReleaseOptions(
        name=args.name, intended_use=args.intended_use, out_of_scope=args.out_of_scope,
        limitations=args.limitation, data_description=args.data_description,
        fairness_report=args.fairness_report, privacy_audit=args.privacy_audit,
        allow_unbound_report=args.allow_unbound_report, sign_key=args.sign))
    p = m["privacy"]
    again = p["recomputed_epsilon"]
    claim = (f"epsilon {p['epsilon']:.4g} (recomputed "
             f"{'n/a' if again is None else format(again, '.4g')}), delta {p['delta']:g}"
             if p["enabled"] and p["epsilon"] is not None else "no DP guarantee")
    sig = m["integrity"].get("signature")
    print(f"released {len(m['files']) + 2 + bool(sig)} files to {args.out}: {claim}")
    if sig:
        print(f"signed release.sha256 with key {sig['key_fingerprint']} -> "
              f"{args.out}/{sig['file']}; anyone can check it: cd {args.out} && {sig['check']}")
    for what, rep in (("fairness report", m["fairness_audit"]),
                      ("privacy audit", m["empirical_privacy_audit"])):
        if rep is not None and not rep["bound_to_weights"]:
            print(f"warning: the {what} is NOT bound to these weights: {rep['unbound_reason']}")
    print(f"model card: {args.out}/MODEL_CARD.md; check it with 'safelm verify {args.out}"
          + (" --allowed-signers FILE'" if sig else "'"))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from safelm.errors import UserError

    from .policy import load_policy
    from .verify import report, verify_release
    policy = load_policy(args.policy)  # a bad policy is a usage error (exit 2) before checks
    if args.identity and not args.allowed_signers:
        raise UserError("--identity needs --allowed-signers FILE (the keys it is checked "
                        "against)")
    lines, status = report(verify_release(args.release_dir, policy, args.allowed_signers,
                                          args.identity))
    print("\n".join(lines))
    return status
