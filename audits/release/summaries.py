"""What a release says about its audits, its data and its evaluation, read from the run dir
and from the audits' report.json files.

Why summaries and not copies: the fairness report names every group and its metrics (useful,
and kept in the report itself), while a release must stay small and must never carry raw text;
the privacy audit's report may hold the planted canary secrets. So only counts, numbers and
short labels are taken, and the source report is pinned by its sha256.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from safelm.errors import UserError
from safelm.hashing import file_sha256

from ..common import jsonable

N_WORST = 5
MAX_LABEL = 80  # strings longer than this are dropped from audit summaries (never raw text)


def report_json_path(given: str | Path, what: str) -> Path:
    """The report.json meant by ``given``: the file, the HTML beside it, or its folder."""
    p = Path(given)
    if p.is_dir():
        p = p / "report.json"
    elif p.suffix.lower() in (".html", ".md"):
        p = p.with_name("report.json")
    if not p.is_file():
        raise UserError(f"{what} {given}: no report.json there; pass the report.json (or "
                        "the folder) that the audit wrote")
    return p


def read_report(path: Path, what: str, required: tuple[str, ...]) -> dict[str, Any]:
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {path}: not readable JSON ({e})") from None
    missing = [k for k in required if not isinstance(tree, dict) or k not in tree]
    if missing:
        raise UserError(f"{what} {path}: missing key(s) {', '.join(missing)}; is this the "
                        "report.json of the right audit?")
    return tree


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and \
        math.isfinite(float(x)) else None


def _scalars(d: Any, strings: bool = True) -> dict[str, Any]:
    """Numbers, booleans, nulls and short strings of a dict (nothing nested, no long text)."""
    if not isinstance(d, dict):
        return {}
    return {str(k): v for k, v in d.items()
            if v is None or isinstance(v, (bool, int, float)) or
            (strings and isinstance(v, str) and len(v) <= MAX_LABEL)}


# ---- binding: a report must be about the released weights ----------------------------------
class UnboundReport(UserError):
    """An audit report that does not show it evaluated the weights being released; ``option``
    names which (``--fairness-report`` or ``--privacy-audit``)."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


def binding(what: str, p: Path, audited: Any, weights_sha256: str, allow_unbound: bool
            ) -> dict[str, Any]:
    """``{"model_sha256", "bound_to_weights", "unbound_reason"}`` for a summary; raises
    :class:`UnboundReport` for an unbound report unless ``allow_unbound``.

    Why a hash and not the run's claimed epsilon or name: two runs can share a claim, and a
    report from yesterday's run would otherwise pass as today's. Only the sha256 of
    ``model.safetensors`` names the weights themselves."""
    audited = audited if isinstance(audited, str) else None
    if audited == weights_sha256:
        return {"model_sha256": audited, "bound_to_weights": True, "unbound_reason": None}
    why = (f"it evaluated other weights (model sha256 {audited[:12]}..., the released "
           f"model.safetensors is {weights_sha256[:12]}...)" if audited else
           "it records no model_sha256 (e.g. a predictions table without its .meta.json "
           "sidecar, or a report from an older SafeLM), so nothing ties it to these weights")
    if not allow_unbound:
        raise UnboundReport(f"{what} {p}: {why}; audit the weights being released (for "
                            "fairness: 'safelm predict' this run, then audit that table "
                            "beside its .meta.json), or pass --allow-unbound-report to attach "
                            "it anyway (the card then says it is unbound)", what)
    return {"model_sha256": audited, "bound_to_weights": False, "unbound_reason": why}


# ---- fairness ------------------------------------------------------------------------------
def excess(d: dict[str, Any]) -> float:
    """How far a disparity is from parity, in units of its tolerance (for ranking)."""
    v, t = _num(d.get("value")), _num(d.get("threshold"))
    if v is None:
        return 0.0
    if d.get("kind") == "ratio":
        gap = 1.0 - min(v, 1.0 / v) if v > 0 else 1.0
        r = min(t, 1.0 / t) if t else None  # a ratio tolerance r stands for [r, 1/r]
        return gap / (1.0 - r) if r is not None and r < 1 else gap
    return abs(v) / t if t else abs(v)


def _group(d: dict[str, Any]) -> str:
    """Who a disparity is about: a group against overall, or the two extremes of a slice."""
    if d.get("max_group") is not None or d.get("min_group") is not None:
        return f"{d.get('max_group')} vs {d.get('min_group')}"
    return str(d.get("label") or d.get("group") or d.get("reference") or "")


def fairness_summary(path: str | Path, weights_sha256: str, allow_unbound: bool = False
                     ) -> dict[str, Any]:
    """n flagged, the worst disparities with their intervals, and the extremes policies use."""
    p = report_json_path(path, "--fairness-report")
    rep = read_report(p, "--fairness-report", ("disparities",))
    inputs = rep.get("inputs") if isinstance(rep.get("inputs"), dict) else {}
    bound = binding("--fairness-report", p, inputs.get("model_sha256"), weights_sha256,
                    allow_unbound)
    disp = [d for d in rep["disparities"] if isinstance(d, dict)]
    ranked = sorted(disp, key=lambda d: (bool(d.get("flagged")), excess(d)), reverse=True)
    worst = [{"slice": d.get("slice"), "group": _group(d),
              "metric": d.get("metric"), "kind": d.get("kind"),
              "reference": d.get("reference"), "value": _num(d.get("value")),
              "ci": jsonable(d.get("ci")), "threshold": _num(d.get("threshold")),
              "flagged": bool(d.get("flagged"))} for d in ranked[:N_WORST]]
    big = [d for d in disp if not d.get("small")]
    diffs = [abs(v) for d in big if d.get("kind") == "difference"
             and (v := _num(d.get("value"))) is not None]
    ratios = [v for d in big if d.get("kind") == "ratio" and (v := _num(d.get("value")))
              is not None]
    summary = rep.get("summary") if isinstance(rep.get("summary"), dict) else {}
    overall = (rep.get("overall") or {}).get("metrics", {}) if isinstance(rep.get("overall"),
                                                                        dict) else {}
    return jsonable({
        "report_sha256": file_sha256(p), "sensitive": rep.get("sensitive"),
        "n_disparities": len(disp), "n_flagged": sum(bool(d.get("flagged")) for d in disp),
        "flagged": [s for s in summary.get("flagged", []) if isinstance(s, str)][:10],
        "worst": worst,
        "max_abs_difference": max(diffs) if diffs else None,
        "min_ratio": min(ratios) if ratios else None,
        "overall": {m: {"value": _num(v.get("value")), "ci": v.get("ci")}
                    for m, v in overall.items() if isinstance(v, dict)},
        "inputs": _scalars(rep.get("inputs")), **bound,
    })


# ---- empirical privacy audit ---------------------------------------------------------------
def _canaries(c: Any) -> dict[str, Any]:
    """Counts and numbers only: the canary strings are secrets planted in the training data."""
    if isinstance(c, list):
        return {"n": len(c)}
    return _scalars(c, strings=False)


def _value(x: Any) -> float | None:
    """A number given plainly or as ``{"value": ...}`` (both forms occur in reports)."""
    return _num(x.get("value")) if isinstance(x, dict) else _num(x)


def _attack(a: dict[str, Any]) -> dict[str, Any]:
    """An attack's name, AUC, empirical epsilon and TPR at each low FPR."""
    out = _scalars(a)
    if "empirical_epsilon" in a:  # older reports: a per-attack bound (now descriptive only)
        out["empirical_epsilon"] = _value(a.get("empirical_epsilon"))
    tpr = a.get("tpr_at_fpr")
    if isinstance(tpr, dict):
        out.update({f"tpr_at_fpr_{k}": _value(v) for k, v in tpr.items()})
    return out


def _one_run(o: Any) -> dict[str, Any] | None:
    """The one-run audit's numbers (no grid rows), with the canary group size the gate needs."""
    if not isinstance(o, dict):
        return None
    out = _scalars(o)
    claim = o.get("claim") if isinstance(o.get("claim"), dict) else {}
    size = claim.get("group_size")
    out["group_size"] = size if isinstance(size, int) and size >= 1 else 1
    return out


def privacy_audit_summary(path: str | Path, weights_sha256: str,
                          allow_unbound: bool = False) -> dict[str, Any]:
    """The empirical lower bound on epsilon (the one-run audit's, when it ran; membership
    inference alone gives none), its confidence and the attacks behind it."""
    p = report_json_path(path, "--privacy-audit")
    rep = read_report(p, "--privacy-audit", ("empirical_epsilon", "claimed_epsilon"))
    inputs = rep.get("inputs") if isinstance(rep.get("inputs"), dict) else {}
    audited = inputs.get("model_sha256") or inputs.get("model.safetensors_sha256")
    bound = binding("--privacy-audit", p, audited, weights_sha256, allow_unbound)
    emp = rep["empirical_epsilon"]
    conf = emp.get("confidence") if isinstance(emp, dict) else None
    attacks = rep.get("attacks")
    attacks = list(attacks.values()) if isinstance(attacks, dict) else attacks or []
    return jsonable({
        "report_sha256": file_sha256(p),
        "empirical_epsilon": _value(emp),
        "confidence": _num(conf if conf is not None else rep.get("confidence")),
        "claimed_epsilon": _num(rep.get("claimed_epsilon")), "delta": _num(rep.get("delta")),
        "passed": rep.get("passed") if isinstance(rep.get("passed"), bool) else None,
        "verdict": rep.get("verdict") if isinstance(rep.get("verdict"), str) else None,
        "attacks": [_attack(a) for a in attacks if isinstance(a, dict)],
        "one_run": _one_run(rep.get("one_run")),
        "canaries": _canaries(rep.get("canaries")),
        "inputs": _scalars(rep.get("inputs")), **bound,
    })


# ---- evaluation and data -------------------------------------------------------------------
def evaluation(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's held-out test metrics (the last ``kind: test`` record) and final validation."""
    test = next((r for r in reversed(records) if r.get("kind") == "test"), None)
    last = next((r for r in reversed(records) if any(k.startswith("val_") for k in r)), None)

    def pick(r: dict[str, Any] | None, prefix: str) -> dict[str, float]:
        return {k[len(prefix):]: v for k, v in (r or {}).items()
                if k.startswith(prefix) and _num(v) is not None}
    return {"split": "test" if test else None, "step": (test or last or {}).get("step"),
            "metrics": pick(test, "test_"), "validation": pick(last, "val_")}


def data_fingerprint(run_dir: Path, cfg: Any, description: str | None) -> dict[str, Any]:
    """Counts and the sha256 of the training file (data.json); never a row of text."""
    info_path = run_dir / "data.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    return {"description": description or "not described (pass --data-description)",
            "sha256": info.get("sha256"), "file_name": Path(info["path"]).name
            if info.get("path") else None,
            "rows": info.get("rows"), "blocks": info.get("blocks"),
            "columns": {"text": cfg.data.text_col, "text_cols": list(cfg.data.text_cols),
                        "label": cfg.data.label_col, "user": cfg.data.user_col, "groups": list(cfg.data.group_cols)},
            "labels": list(cfg.data.labels),
            "split": {"val_frac": cfg.data.val_frac, "test_frac": cfg.data.test_frac,
                      "seed": cfg.train.seed},
            "note": None if info else "the run dir has no data.json (e.g. a federated run): "
                                      "no fingerprint of its data"}
