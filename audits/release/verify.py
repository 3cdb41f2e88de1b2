"""``safelm verify``: integrity, schema, then the policy's gates, one verdict line each.

Order matters: the policy reads release.json, so it is evaluated only when release.json has
the schema (otherwise one ``FAIL policy`` line says so). Integrity failures do not stop the
policy gates, so a reader sees everything that is wrong at once; any failure exits 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from safelm.errors import UserError
from safelm.hashing import file_sha256

from . import manifest as mf
from . import signing
from .policy import Policy

REL_TOL = 1e-3  # a claim may sit this far (relative) below a recomputation by another version


@dataclass
class Gate:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def verify_release(release: str | Path, policy: Policy | None = None,
                   allowed_signers: str | Path | None = None, identity: str | None = None
                   ) -> list[Gate]:
    """Every gate's verdict for the release dir ``release`` under ``policy``; the
    ``signature`` gate checks ``release.sha256.sig`` against ``allowed_signers``."""
    d, policy = Path(release), policy or Policy()
    allowed = signing.read_allowed_signers(allowed_signers) if allowed_signers else None
    if not d.is_dir():
        raise UserError(f"{d}: no such release dir; pass the --out of 'safelm release'")
    if not (d / mf.RELEASE_JSON).exists() and not (d / mf.SUMS).exists():
        raise UserError(f"{d}: not a release dir (no {mf.RELEASE_JSON} or {mf.SUMS}); make "
                        "one with 'safelm release RUN_DIR --out DIR'")
    m = mf.read_manifest(d)
    problems = mf.check_integrity(d, m)
    gates = [Gate("integrity", not problems, "; ".join(problems[:6]) + (
        f" (+{len(problems) - 6} more)" if len(problems) > 6 else "") if problems else
        f"{len(m['files']) + 2} files, every sha256 matches; release digest "
        f"{file_sha256(d / mf.SUMS)}")]
    gates += _signature_gate(d, m, policy, allowed, identity)
    schema = mf.check_schema(m, d)
    gates.append(Gate("schema", not schema, "; ".join(schema[:6]) if schema else
                      f"{mf.KIND} schema {mf.SCHEMA_VERSION}, privacy claim matches "
                      "privacy.json" if m and m["privacy"]["enabled"] else
                      f"{mf.KIND} schema {mf.SCHEMA_VERSION}"))
    if schema:
        return gates + [Gate("policy", False, "not evaluated: release.json does not follow "
                                              "the schema")]
    for name, check in policy_gates(policy, m):
        try:
            ok, detail = check()
        except (TypeError, KeyError, ValueError, AttributeError, IndexError) as e:
            ok, detail = False, f"malformed value in release.json ({type(e).__name__}: {e})"
        gates.append(Gate(name, ok, detail))
    return gates


def _signature_gate(d: Path, m: dict[str, Any] | None, policy: Policy, allowed: Path | None,
                    identity: str | None) -> list[Gate]:
    """Gate ``signature``: evaluated when --allowed-signers is given, the policy requires a
    signature, or the release carries or declares one (an unsigned release without either
    has no such gate, so it verifies as before)."""
    integrity = m.get("integrity") if isinstance(m, dict) else None
    declared = integrity.get("signature") if isinstance(integrity, dict) else None
    declared = declared if isinstance(declared, dict) else None
    present = (d / signing.SIG).exists()
    if allowed is None and not (policy.require_signature or present or declared):
        return []
    if allowed is None and policy.require_signature:
        return [Gate("signature", False, "the policy requires a signature checked against "
                                         "trusted keys: pass --allowed-signers FILE")]
    c = signing.verify_signature(d, allowed, identity, declared)
    return [Gate("signature", c.ok, c.detail)]


def _claim(m: dict[str, Any]) -> float | None:
    p = m["privacy"]
    eps = p.get("epsilon") if p.get("enabled") else None
    return float(eps) if isinstance(eps, (int, float)) and math.isfinite(eps) else None


def policy_gates(pol: Policy, m: dict[str, Any]
                 ) -> list[tuple[str, Callable[[], tuple[bool, str]]]]:
    """(gate name, check) for every gate the policy turns on, in reporting order."""
    priv, emp, fair = m["privacy"], m["empirical_privacy_audit"], m["fairness_audit"]
    eps = _claim(m)
    no_dp = "not trained with DP" if not priv.get("enabled") else "DP without noise: no " \
        "finite epsilon"
    gates: list[tuple[str, Callable[[], tuple[bool, str]]]] = []
    if pol.require_dp:
        gates.append(("require_dp", lambda: (eps is not None, f"epsilon {eps:.4g}, delta "
                      f"{priv['delta']:g}, per {priv['unit']}" if eps is not None else no_dp)))
    if pol.max_epsilon is not None:
        gates.append(("max_epsilon", lambda: (eps is not None and eps <= pol.max_epsilon,
                      f"epsilon {eps:.4g} vs max {pol.max_epsilon:g}" if eps is not None
                      else f"{no_dp} (epsilon infinite) vs max {pol.max_epsilon:g}")))
    if pol.max_delta is not None:
        delta = priv.get("delta")
        gates.append(("max_delta", lambda: (eps is not None and delta <= pol.max_delta,
                      f"delta {delta} vs max {pol.max_delta:g}")))
    if pol.require_secret_noise:
        gates.append(("require_secret_noise", lambda: _secret_noise_gate(priv)))
    if pol.recompute_epsilon and eps is not None:
        gates.append(("epsilon_recomputes", lambda: _recompute_gate(priv, eps)))
    if pol.require_empirical_audit:
        gates.append(("require_empirical_audit", lambda: (
            emp is not None and emp.get("empirical_epsilon") is not None,
            _empirical_audit_detail(emp))))
    if pol.empirical_le_claimed and emp is not None:
        gates.append(("empirical_le_claimed", lambda: _empirical_gate(emp, eps)))
    if pol.require_fairness_audit:
        gates.append(("require_fairness_audit", lambda: (fair is not None, "attached" if fair
                      else "no fairness audit attached (release with --fairness-report)")))
    if pol.require_bound_audits and (emp is not None or fair is not None):
        gates.append(("audits_bound", lambda: _bound_gate(m)))
    for key, field, better in (("max_flagged_disparities", "n_flagged", "le"),
                               ("max_abs_difference", "max_abs_difference", "le"),
                               ("min_ratio", "min_ratio", "ge")):
        limit = getattr(pol, key)
        if limit is not None:
            gates.append((key, lambda f=field, lim=limit, b=better: _fair_gate(fair, f, lim, b)))
    return gates


def _secret_noise_gate(priv: dict[str, Any]) -> tuple[bool, str]:
    """The guarantee assumes noise nobody can replay: a seeded run (privacy.reproducible)
    or a ledger that does not say where its noise came from fails."""
    if not priv.get("enabled"):
        return False, "not trained with DP: there is no noise to keep secret"
    source = priv.get("noise_source")
    if source == "os_entropy":
        return True, "noise and sampling drew from the operating system's entropy"
    if source == "seeded":
        return False, ("noise seeded from train.seed (privacy.reproducible=true): anyone with "
                       "the config can replay it; retrain without privacy.reproducible")
    return False, "the ledger does not record its noise source (trained by an older SafeLM)"


def _bound_gate(m: dict[str, Any]) -> tuple[bool, str]:
    """Each attached audit's model_sha256 must be the released model.safetensors' (whose
    hash the integrity gate checked against the file itself)."""
    weights = m["files"].get("model.safetensors")
    bad, good = [], []
    for what, rep in (("fairness audit", m["fairness_audit"]),
                      ("empirical privacy audit", m["empirical_privacy_audit"])):
        if rep is None:
            continue
        inputs = rep.get("inputs") if isinstance(rep.get("inputs"), dict) else {}
        # Releases made before summaries had model_sha256 kept the report's inputs.
        h = rep.get("model_sha256") or inputs.get("model_sha256") or \
            inputs.get("model.safetensors_sha256")
        if h is not None and h == weights:
            good.append(what)
        else:
            bad.append(f"the {what} evaluated "
                       + (f"other weights (sha256 {str(h)[:12]}...)" if h else
                          "unrecorded weights (no model_sha256)"))
    if bad:
        return False, ("; ".join(bad) + " (attached with --allow-unbound-report; set "
                       "require_bound_audits = false to accept that)")
    return True, f"{' and '.join(good)} evaluated the released weights ({str(weights)[:12]}...)"


def _recompute_gate(priv: dict[str, Any], eps: float) -> tuple[bool, str]:
    from .accounting import recompute
    again = recompute(priv["history"], priv["delta"], priv["accountant"])
    if again is None:
        return False, f"the history gives no finite epsilon, yet {eps:.4g} is claimed"
    ok = eps >= again * (1 - REL_TOL)
    return ok, (f"a fresh {priv['accountant']} accountant gives {again:.4g} from the history; "
                f"claimed {eps:.4g}" + ("" if ok else " (the claim understates it)"))


def _empirical_audit_detail(emp: dict[str, Any] | None) -> str:
    """What ``require_empirical_audit`` saw: it needs an audit that bounds epsilon."""
    if emp is None:
        return "no empirical privacy audit attached (release with --privacy-audit)"
    if emp.get("empirical_epsilon") is None:
        return ("the attached privacy audit gives no epsilon bound (membership inference is "
                "descriptive only); attach a one-run audit: train with "
                "privacy.canary_inclusion=bernoulli, then 'safelm audit privacy RUN --one-run'")
    return f"attached, with an epsilon lower bound of {emp['empirical_epsilon']}"


def _empirical_gate(emp: dict[str, Any], eps: float | None) -> tuple[bool, str]:
    """The audit's bound against the claim. A one-run bound concerns one canary, which under
    example-level DP is a group of ``group_size`` rows: its claim is group_size x epsilon."""
    bound = emp.get("empirical_epsilon")
    conf = emp.get("confidence")
    one = emp.get("one_run") if isinstance(emp.get("one_run"), dict) else {}
    size = one.get("group_size") if isinstance(one.get("group_size"), int) else 1
    eps = eps * size if eps is not None else None
    claim = (f"{eps:.4g}" + (f" ({size}-row canary)" if size > 1 else "")
             if eps is not None else "infinity (no DP)")
    if bound is None:
        return True, f"the audit reports no finite lower bound; claimed {claim}"
    ok = eps is None or bound <= eps
    return ok, (f"empirical lower bound {bound:.4g} (confidence {conf}) vs claimed {claim}"
                + ("" if ok else ": the attacks show more leakage than the guarantee allows"))


def _fair_gate(fair: dict[str, Any] | None, field: str, limit: float, better: str
               ) -> tuple[bool, str]:
    if fair is None:
        return False, "no fairness audit attached, so the limit cannot be shown to hold"
    v = fair.get(field)
    if v is None:
        return True, f"no {field.replace('_', ' ')} in the audit"
    ok = v <= limit if better == "le" else v >= limit
    shown = f"{v}" if isinstance(v, int) else f"{v:.4g}"
    worst = [w for w in fair.get("worst", []) if w.get("flagged")][:2]
    tail = "" if ok or not worst else "; worst: " + "; ".join(
        f"{w['slice']} {w['group']} {w['metric']} {w['kind']} {w['value']:.3g} {w['ci']}"
        for w in worst)
    return ok, f"{field} {shown} vs {'max' if better == 'le' else 'min'} {limit:g}{tail}"


def report(gates: list[Gate]) -> tuple[list[str], int]:
    """Output lines (one per gate, then a verdict) and the exit status (0 all pass, 1 not)."""
    failed = [g.name for g in gates if not g.ok]
    lines = [g.line() for g in gates]
    lines.append(f"verify: FAILED {len(failed)} of {len(gates)} gates: {', '.join(failed)}"
                 if failed else f"verify: all {len(gates)} gates passed")
    return lines, 1 if failed else 0
