"""Simulated predictions for the fairness tests (no model training).

``simulate`` mimics a classifier trained on the bundled sentiment corpus: it predicts the
*training* label rule (the clean sentiment of the text) with a little noise, and, when the
corpus has a planted bias, it has learned that bias: for rows of the biased group (female x
old) it predicts "negative" for a share ``bias`` of the truly positive rows, exactly as the
flipped training labels taught it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from safelm.corpus import sentiment_corpus


def simulate(bias: float, split: str = "test", n: int = 6000, noise: float = 0.05,
             seed: int = 0) -> pd.DataFrame:
    rows = sentiment_corpus(n=n, bias=bias, seed=0)
    rows = rows[rows["split"] == split].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    truth = rows["label_clean"].to_numpy()
    pos = truth == "positive"
    pred_pos = pos.copy()
    flip = rng.random(len(rows)) < noise
    pred_pos[flip] = ~pred_pos[flip]
    biased = ((rows["gender"] == "female") & (rows["age_group"] == "old")).to_numpy()
    learned = biased & pos & (rng.random(len(rows)) < bias)
    pred_pos[learned] = False
    score = np.clip(np.where(pred_pos, 0.8, 0.2) + rng.normal(0, 0.1, len(rows)), 0, 1)
    return pd.DataFrame({"example_id": rows["example_id"], "y_true": rows["label"],
                         "y_pred": np.where(pred_pos, "positive", "negative"), "score": score,
                         "nll": -np.log(np.where(pos, score, 1 - score).clip(1e-6)),
                         "n_tokens": 12, "gender": rows["gender"],
                         "age_group": rows["age_group"], "region": rows["region"]})


def write(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path


def random_binary(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    """Random binary predictions with unequal group sizes and group-dependent rates."""
    rng = np.random.default_rng(seed)
    g1 = rng.choice(["a", "b", "c"], n, p=[0.6, 0.3, 0.1])
    g2 = rng.choice(["x", "y"], n, p=[0.7, 0.3])
    p_true = np.select([g1 == "a", g1 == "b"], [0.5, 0.3], 0.6)
    y = rng.random(n) < p_true
    score = np.clip(np.where(y, 0.65, 0.35) + rng.normal(0, 0.2, n), 0, 1)
    pred = score > np.where(g2 == "x", 0.5, 0.45)
    return pd.DataFrame({"example_id": [f"e{i}" for i in range(n)],
                         "y_true": np.where(y, "yes", "no"), "y_pred": np.where(pred, "yes", "no"),
                         "score": score, "g1": g1, "g2": g2})
