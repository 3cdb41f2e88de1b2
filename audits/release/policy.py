"""Release policies: what a release must show before it may be used, as a TOML or JSON file.

Keys (all optional; a file may also put them under a ``[policy]`` table)::

    require_dp = true               # trained with DP and a finite epsilon    (default false)
    max_epsilon = 8.0               # claimed epsilon at most this             (default none)
    max_delta = 1e-5                # claimed delta at most this               (default none)
    recompute_epsilon = true        # a fresh Opacus accountant on the history
                                    # gives no more than the claim             (default true)
    require_empirical_audit = true  # a privacy audit with an epsilon bound is
                                    # attached (the one-run audit; membership
                                    # inference alone gives no bound)          (default false)
    empirical_le_claimed = true     # its lower bound <= the claimed epsilon (a
                                    # one-run bound: <= group_size x epsilon)
                                    # (checked when an audit is attached)      (default true)
    require_fairness_audit = true   # a fairness audit is attached             (default false)
    max_flagged_disparities = 0     # at most this many flagged disparities    (default none)
    max_abs_difference = 0.1        # |difference| disparities, groups not
                                    # marked small, at most this               (default none)
    min_ratio = 0.8                 # ratio disparities at least this          (default none)
    require_signature = true        # release.sha256.sig verifies against
                                    # verify's --allowed-signers FILE          (default false)
    require_bound_audits = true     # every attached audit evaluated the
                                    # released weights (its model_sha256)      (default true)
    require_secret_noise = true     # DP noise and sampling drew from the OS's
                                    # entropy, not a written seed (privacy.json
                                    # noise_source "os_entropy")               (default false)

Without a policy file ``verify`` checks integrity, the schema, the recomputed epsilon and,
when an empirical audit is attached, that its bound does not exceed the claim. A limit on
the fairness audit (``max_*``/``min_ratio``) fails when no fairness audit is attached: an
absent audit cannot show that a limit holds.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safelm.errors import UserError


@dataclass
class Policy:
    require_dp: bool = False
    max_epsilon: float | None = None
    max_delta: float | None = None
    recompute_epsilon: bool = True
    require_empirical_audit: bool = False
    empirical_le_claimed: bool = True
    require_fairness_audit: bool = False
    max_flagged_disparities: int | None = None
    max_abs_difference: float | None = None
    min_ratio: float | None = None
    require_signature: bool = False
    require_bound_audits: bool = True
    require_secret_noise: bool = False


FIELDS = {f.name: f for f in dataclasses.fields(Policy)}


def _parse(p: Path) -> dict[str, Any]:
    text = p.read_text(encoding="utf-8")
    try:
        tree = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        kind = "JSON" if p.suffix.lower() == ".json" else "TOML"
        raise UserError(f"--policy {p}: not valid {kind} ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise UserError(f"--policy {p}: must be a table of keys (see 'safelm verify --help')")
    if set(tree) == {"policy"} and isinstance(tree["policy"], dict):
        tree = tree["policy"]
    return tree


def _value(p: Path, key: str, v: Any) -> Any:
    """``v`` checked against the field's type: booleans, counts, non-negative numbers."""
    kind = FIELDS[key].type
    if "bool" in kind:
        ok = isinstance(v, bool)
    elif "int" in kind:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
    else:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
    if not ok:
        want = "true or false" if "bool" in kind else "a number >= 0" if "float" in kind \
            else "a whole number >= 0"
        raise UserError(f"--policy {p}: {key} = {v!r} must be {want}")
    return float(v) if "float" in kind else v


def load_policy(path: str | Path | None) -> Policy:
    """The policy in ``path`` (None: the defaults); every key and value checked."""
    if path is None:
        return Policy()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--policy {p}: no such file; pass a TOML or JSON policy file")
    values = {}
    for key, v in _parse(p).items():
        if key not in FIELDS:
            near = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"did you mean {near[0]}?" if near else "known: " + ", ".join(FIELDS)
            raise UserError(f"--policy {p}: unknown key {key!r}; {hint}")
        values[key] = _value(p, key, v)
    return Policy(**values)
