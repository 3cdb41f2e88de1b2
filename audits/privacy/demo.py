"""The demo's privacy step: audit the DP sentiment classifier (not registered as a plugin step;
the demo's audit plugin calls :func:`demo_step`).

Members are the classifier's training-split rows, non-members its test-split rows (the bundled
corpus carries a ``split`` column, which is also what the run's split used). One subtlety: the
bundled corpus plants a label bias by flipping labels in the *training* rows of one demographic
cell only, so in that cell members and non-members come from different distributions and even a
perfectly private model would tell them apart. The demo therefore leaves every cell with a
flipped training label out of both files, so the two files stay exchangeable. The attacks are
descriptive only (AUC, TPR at low FPR): rows of one model, chosen by a split, are no independent
trials of the DP game, so no epsilon bound is drawn from them; the valid bound is the one-run
canary audit (``safelm audit privacy RUN --one-run``, on an LM run with bernoulli canaries).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from .audit import PrivacySettings, privacy_audit

CELL = ["gender", "age_group"]


def member_files(data: Path, out: Path) -> tuple[Path, Path, int]:
    """members.csv (train split) and non_members.csv (test split), without the cells whose
    training labels were flipped; returns the paths and how many rows were left out."""
    df = pd.read_csv(data, dtype=str, keep_default_na=False)
    keep = pd.Series(True, index=df.index)
    if "label_clean" in df.columns and set(CELL) <= set(df.columns):
        flipped = df[(df["label"] != df["label_clean"])][CELL].drop_duplicates()
        cell = df[CELL].apply(tuple, axis=1)
        keep = ~cell.isin(set(flipped.apply(tuple, axis=1)))
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "members.csv", out / "non_members.csv")
    for split, path in zip(("train", "test"), paths):
        df[keep & (df["split"] == split)].to_csv(path, index=False)
    return paths[0], paths[1], int((~keep & df["split"].isin(["train", "test"])).sum())


def demo_step(ctx: dict[str, Any]) -> None:
    """Audit ``ctx["dp_classifier_run"]``; print a few lines; add the report paths to ctx."""
    out = Path(ctx["out"])
    print("\n[audit] privacy of the DP classifier: membership inference (descriptive)")
    members, non_members, left_out = member_files(Path(ctx["data"]["sentiment"]),
                                                  out / "audit-privacy" / "data")
    settings = PrivacySettings(reference_models=2, n_boot=300 if ctx.get("quick") else 1000)
    rep = privacy_audit(ctx["dp_classifier_run"], members, non_members, out / "audit-privacy",
                        settings=settings, log=lambda s: None)
    for a in rep["attacks"]:
        auc, t = a["auc"], a["tpr_at_fpr"]["0.01"]
        print(f"  {a['name']} attack: AUC {auc['value']:.3f} [{auc['ci'][0]:.3f}, "
              f"{auc['ci'][1]:.3f}], TPR at 1% FPR {t['value']:.4f}")
    claimed = rep["claimed_epsilon"]
    print("  claimed epsilon " + (f"{claimed:.2f}" if claimed is not None else "none")
          + f" ({rep['n']['members']} members, {rep['n']['non_members']} non-members; "
          f"{left_out} rows of the bias-flipped cell left out)")
    print(f"  {rep['verdict']}")
    ctx["privacy_audit"] = rep["_paths"]["json"]
    ctx["privacy_audit_html"] = rep["_paths"]["html"]
    print(f"  privacy report: {rep['_paths']['html']}")
