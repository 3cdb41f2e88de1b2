"""Differential privacy for the one Trainer: DP-SGD through Opacus (see ``engine``), exact
one-backward per-sample clipping (``bk``), user-level sampling (``users``)."""

from __future__ import annotations

from .engine import DifferentialPrivacy, PoissonBatchSampler, resolve_mode, validate

__all__ = ["DifferentialPrivacy", "PoissonBatchSampler", "make_privacy", "recompute_epsilon",
           "resolve_mode", "validate"]


MAX_BLOCKS_PER_EXAMPLE = 8  # longer LM examples contribute a random 8 of their blocks a step


def make_privacy(cfg, prep) -> DifferentialPrivacy:
    """The privacy engine for a prepared central run (``safelm.api.Prepared``)."""
    from ..errors import UserError
    train_rows = prep.splits["train"]
    example = prep.encoded["train"].example.numpy()  # block -> row
    if cfg.privacy.unit == "user":
        if "user" not in train_rows.columns:
            raise UserError("privacy.unit=user needs a user column: pass --user-col "
                            "(or --set data.user_col=...)")
        keys = train_rows["user"].to_numpy()[example]
        cap = cfg.privacy.max_examples_per_user
    else:  # an example cut into several LM blocks is still one unit
        keys, cap = example, MAX_BLOCKS_PER_EXAMPLE
    groups: dict = {}
    for block, key in enumerate(keys):
        groups.setdefault(key, []).append(block)
    users = list(groups.values())
    rows = min(cap, max(len(g) for g in users))
    if cfg.privacy.unit == "example" and rows == 1:
        users = None  # one block per example: plain Poisson over examples
    n_units = len(users) if users is not None else len(example)
    t = cfg.train
    return DifferentialPrivacy(cfg.privacy, n_units=n_units, batch_size=t.batch_size,
                               epochs=t.epochs, max_steps=t.max_steps, seed=t.seed, users=users,
                               rows_per_unit=rows)


def recompute_epsilon(ledger: dict, accountant: str | None = None) -> float:
    """Epsilon from a privacy.json ledger's history with a fresh Opacus accountant.

    An empty history is 0 (no step taken); a phase without noise is ``inf`` (no guarantee).
    An accountant Opacus does not know is a UserError.
    """
    import math

    from opacus.accountants import create_accountant

    from ..errors import UserError
    history = ledger["history"]
    if not history:
        return 0.0
    if any(float(s) <= 0 for s, _, _ in history):
        return math.inf
    name = accountant or ledger["accountant"]
    try:
        acc = create_accountant(mechanism=name)
    except ValueError:
        raise UserError(f"privacy.json names the accountant {name!r}, which Opacus does not "
                        "know (use prv or rdp)") from None
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=float(ledger["delta"])))
