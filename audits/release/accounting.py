"""The privacy claim of a release, and its recomputation with a fresh Opacus accountant.

Why recompute here instead of trusting ``privacy.json``: the claim is the one number a release
exists to state, and the ledger's ``history`` ([noise multiplier, sample rate, steps] per
phase) is enough to derive it again with an accountant that never saw the training. The
release records the recomputed value beside the claim, and ``verify`` recomputes it once more
from the released bytes, with ``safelm.recompute_epsilon`` (a fresh Opacus accountant,
imported on first use: it pulls in torch).
"""

from __future__ import annotations

import math
from typing import Any

from safelm.errors import UserError

LEDGER_KEYS = ("epsilon", "delta", "accountant", "unit", "sampling", "max_grad_norm",
               "history", "target_epsilon")


def recompute(history: list[list[float]], delta: float, accountant: str) -> float | None:
    """Epsilon at ``delta`` for ``history`` with a new accountant; None: no finite bound."""
    from safelm import recompute_epsilon
    eps = recompute_epsilon({"history": history, "delta": delta, "accountant": accountant})
    return eps if math.isfinite(eps) else None


def privacy_section(ledger: dict[str, Any] | None) -> dict[str, Any]:
    """release.json's ``privacy``: the ledger's claim, how to recompute it, and the result."""
    if ledger is None:
        return {"enabled": False, "epsilon": None, "delta": None, "unit": None,
                "accountant": None, "sampling": None, "max_grad_norm": None, "history": [],
                "target_epsilon": None, "recomputed_epsilon": None,
                "statement": "not trained with differential privacy: no privacy guarantee"}
    missing = [k for k in LEDGER_KEYS if k not in ledger]
    if missing:
        raise UserError(f"privacy.json lacks {', '.join(missing)}; it cannot back a privacy "
                        "claim (retrain with a current SafeLM)")
    again = recompute(ledger["history"], ledger["delta"], ledger["accountant"])
    out = {k: ledger[k] for k in LEDGER_KEYS}
    out.update({"enabled": True, "recomputed_epsilon": again,
                "recomputed_with": f"opacus {_opacus_version()} {ledger['accountant']} "
                                   "accountant, fresh, on history",
                "noise_multiplier": ledger.get("noise_multiplier"),
                "sample_rate": ledger.get("sample_rate"), "steps": ledger.get("steps"),
                "dataset_size": ledger.get("dataset_size"),
                "noise_source": ledger.get("noise_source"),
                "mechanism": ledger.get("mechanism", "DP-SGD (Opacus style), Poisson sampling"),
                "statement": statement(ledger)})
    return out


def statement(ledger: dict[str, Any]) -> str:
    """The guarantee in one sentence a reader can check against the numbers."""
    eps = ledger.get("epsilon")
    if eps is None:
        return "trained with DP-SGD but without noise: no finite epsilon, no guarantee"
    unit = ledger.get("unit", "example")
    return (f"({eps:.3g}, {ledger['delta']:g})-differential privacy per {unit}: adding or "
            f"removing one {unit}'s data changes the probability of any released weights by "
            f"at most a factor e^{eps:.3g} (except with probability {ledger['delta']:g})")


def _opacus_version() -> str:
    from importlib.metadata import version
    return version("opacus")
