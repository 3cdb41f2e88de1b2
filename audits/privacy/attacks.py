"""Membership-inference attacks on a SafeLM run: the loss attack and an offline reference-model
(LiRA-style) attack.

Inputs are two data files, members (rows the run trained on) and non-members (rows from the
same population it did not see). Both are read with the run's own column settings (or the
``--text-col`` ... overrides) and rewritten as normalized CSVs (``example_id, text[, label]``) in
a scratch folder, so the target and every reference model score exactly the same rows.

Attacks (higher score = "member"):

* ``loss``: score = -NLL of the row under the target (Yeom et al. 2018). The NLL is the
  predictions table's: label cross-entropy (classifier) or mean per-token NLL (LM).
* ``reference``: offline LiRA with a global variance (Carlini et al. 2022), equivalently
  difficulty-calibrated loss (Watson et al. 2022): score = phi_target(x) - mean over reference
  models that never trained on x of phi_ref(x), where phi is the logit of the true label's
  probability (classifier) or -NLL (LM). Subtracting the reference models' view of how hard x
  is removes most of the example-to-example variation that the plain loss attack confuses with
  membership. One global variance, not per-example ones, because a few reference models cannot
  estimate a variance per example; dividing every score by a constant would not change a rank.

Reference models, and why members never reach them: the references are trained by
``safelm.api.train_run`` with the target's config (same model, optimizer, epochs, DP settings,
a different seed) on data drawn from the *non-members only*. They come in complementary pairs:
pair p splits the non-members at random into halves A_p and B_p and trains one model on each.
Then every non-member was left out by exactly one model of each pair, and members by both; to
keep the two classes' scores alike, a member uses one model of each pair, picked at random. So
each row's reference mean is over exactly one OUT model per pair, and no reference model ever
saw a member row. (Caveat: a reference trains on half of the non-members, usually far fewer rows
than the target; that shifts every reference NLL alike and does not favour either class.)
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from safelm.errors import UserError

NORMALIZED = {"format": "csv", "text_col": "text", "text_cols": [], "label_col": "label",
              "id_col": "example_id", "user_col": "", "group_cols": [], "split_col": "split"}


@dataclass
class Inputs:
    """The two row sets, normalized, and where their CSVs are."""

    members: pd.DataFrame
    non_members: pd.DataFrame
    members_csv: Path
    non_members_csv: Path
    dropped_duplicates: int


def read_rows(path: str | Path, cfg: Any, overrides: dict[str, Any], what: str) -> pd.DataFrame:
    """Rows of a user's file by the run's data settings (+ column overrides)."""
    from safelm.data import load_rows
    data = dataclasses.replace(cfg.data, **{**overrides, "user_col": "", "group_cols": []})
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p}: no such file; give the CSV/JSONL/TXT file of {what} rows")
    return load_rows(p, data, cfg.train.task)


def load_inputs(cfg: Any, members: str | Path, non_members: str | Path,
                overrides: dict[str, Any], work: Path, min_rows: int) -> Inputs:
    """Read, check and normalize both files; drop non-members whose exact text (and label) is
    also a member's: they cannot be told apart, whatever the model did."""
    from safelm.hashing import file_sha256
    m = read_rows(members, cfg, overrides, "--members")
    n = read_rows(non_members, cfg, overrides, "--non-members")
    if file_sha256(members) == file_sha256(non_members):
        raise UserError(f"--members {members} and --non-members {non_members} are the same "
                        "data; non-members must be rows the run did not train on")
    key = ["text", "label"] if "label" in m.columns else ["text"]
    seen = set(map(tuple, m[key].to_numpy().tolist()))
    dup = np.array([tuple(r) in seen for r in n[key].to_numpy().tolist()], dtype=bool)
    if dup.mean() > 0.5:
        raise UserError(f"{dup.sum()} of {len(n)} --non-members rows are also in --members "
                        f"({members}); give rows the run did not train on (e.g. the test split)")
    n = n[~dup].reset_index(drop=True)
    for name, df, path in (("--members", m, members), ("--non-members", n, non_members)):
        if len(df) < min_rows:
            raise UserError(f"{name} {path}: {len(df)} usable rows; the audit needs at least "
                            f"{min_rows} (pass more rows)")
    cols = ["example_id", "text"] + (["label"] if "label" in m.columns else [])
    paths = (work / "members.csv", work / "non_members.csv")
    for df, path in zip((m, n), paths):
        df[cols].to_csv(path, index=False)
    return Inputs(m[cols], n[cols], paths[0], paths[1], int(dup.sum()))


def phi(nll: np.ndarray, task: str) -> np.ndarray:
    """The reference attack's statistic: logit of p(true label), or -NLL for an LM."""
    nll = np.asarray(nll, dtype=float)
    if task != "classify":
        return -nll
    p = np.clip(np.exp(-nll), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def score_nll(run: Any, inputs: Inputs) -> np.ndarray:
    """NLL of members then non-members under ``run`` (one array, members first)."""
    from safelm.api import predictions_table
    parts = [predictions_table(run, path, data_overrides=NORMALIZED)["nll"].to_numpy(float)
             for path in (inputs.members_csv, inputs.non_members_csv)]
    return np.concatenate(parts)


def reference_config(target_cfg: Any, seed: int, settings: list[str]) -> Any:
    """The target's recipe for a reference model: same model, training and DP settings; a new
    seed; normalized columns; no canaries, no user-level unit (the normalized rows have no
    users), no group reweighting (no group columns); then the user's ``settings``."""
    from safelm.config import Config
    cfg = Config.from_dict(target_cfg.to_dict())
    for key, value in {**NORMALIZED, "val_frac": 0.0, "test_frac": 0.0}.items():
        setattr(cfg.data, key, value)
    cfg.train.seed, cfg.train.progress = seed, "off"
    cfg.train.checkpoint_every = 10**9
    if hasattr(cfg.train, "reweight"):
        cfg.train.reweight = "none"
    cfg.privacy.canaries, cfg.privacy.canary_inclusion, cfg.privacy.unit = 0, "", "example"
    for item in settings:
        cfg.set(item)
    return cfg.validate()


def reference_scores(target: Any, inputs: Inputs, n_models: int, settings: list[str],
                     seed: int, work: Path,
                     log: Callable[[str], None] = print) -> tuple[np.ndarray, dict[str, Any]]:
    """Train ``n_models`` reference models (complementary pairs over the non-members) and
    return each row's mean phi over one OUT model per pair (members first)."""
    from safelm.api import load_run, train_run
    if n_models % 2 or n_models < 2:
        raise UserError(f"--reference-models {n_models}: give an even number >= 2 (models "
                        "come in pairs trained on complementary halves of the non-members), "
                        "or 0 to skip the reference attack")
    task = target.cfg.train.task
    nm, nn_ = len(inputs.members), len(inputs.non_members)
    rng = np.random.default_rng([seed, 0x4EF])
    phi_sum = np.zeros(nm + nn_)
    trained: list[dict[str, Any]] = []
    for pair in range(n_models // 2):
        side_a = np.zeros(nn_, dtype=bool)
        side_a[rng.permutation(nn_)[: nn_ // 2]] = True
        member_pick = rng.integers(0, 2, size=nm)  # which model of the pair a member uses
        for side, in_half in enumerate((side_a, ~side_a)):
            j = 2 * pair + side
            data = work / f"ref{j}.csv"
            inputs.non_members[in_half].assign(split="train").to_csv(data, index=False)
            cfg = reference_config(target.cfg, target.cfg.train.seed + 1000 + j, settings)
            log(f"  reference model {j + 1}/{n_models}: {int(in_half.sum())} non-member rows")
            final = train_run(data, cfg, work / f"ref{j}")
            ph = phi(score_nll(load_run(work / f"ref{j}"), inputs), task)
            use = np.concatenate([member_pick == side, ~in_half])  # OUT rows that use model j
            phi_sum[use] += ph[use]
            trained.append({"rows": int(in_half.sum()), "seed": cfg.train.seed,
                            "epsilon": final.get("epsilon")})
    return phi_sum / (n_models // 2), {"n": n_models, "settings": list(settings),
                                       "models": trained}


def attack_scores(target: Any, inputs: Inputs, *, reference_models: int,
                  reference_settings: list[str], seed: int,
                  log: Callable[[str], None] = print) -> tuple[dict[str, np.ndarray], dict]:
    """Scores of every attack (members first) and a description of the reference models."""
    task = target.cfg.train.task
    nll = score_nll(target, inputs)
    if not np.all(np.isfinite(nll)):
        raise UserError("some rows got no score (no tokens?): drop empty texts from the files")
    scores = {"loss": -nll}
    refs: dict[str, Any] = {"n": 0}
    if reference_models:
        with tempfile.TemporaryDirectory(dir=inputs.members_csv.parent) as tmp:
            ref_phi, refs = reference_scores(target, inputs, reference_models,
                                             reference_settings, seed, Path(tmp), log)
        scores["reference"] = phi(nll, task) - ref_phi
    return scores, refs


DESCRIPTIONS = {
    "loss": "loss threshold (Yeom et al. 2018): score = -NLL under the target",
    "reference": "offline LiRA, global variance (Carlini et al. 2022): score = phi_target - "
                 "mean phi of reference models that never saw the row",
}
