"""In-training fairness mitigation: per-example loss weights from group (and label) counts.

Two schemes, chosen by ``train.reweight`` over the intersection of ``train.reweight_cols``
(default: every ``data.group_cols``):

``groups``
    Every intersectional group carries the same total weight in the loss:
    ``w(g) = N / (K * n_g)`` for K groups. A small group's examples count as much, together,
    as a large group's, so the model stops optimizing for the majority alone (accuracy gaps
    that come from under-representation).

``groups_labels``
    Reweighing (Kamiran & Calders, 2012): ``w(g, y) = P(g) P(y) / P(g, y)
    = n_g n_y / (N n_gy)``. Under these weights group and label are independent in the
    training data, so a label bias against a group (fewer positive labels than its share,
    e.g. the bundled corpus' planted bias) no longer teaches the model to predict the
    group's membership into the label. Classification only.

Both have weighted mean 1 over the training rows, so the learning rate keeps its meaning.
Weights are computed from the training split only; validation and test metrics stay
unweighted, so they report what the model really does.

Why not with DP-SGD: the weights are functions of the private training data's group counts,
and changing one example changes every weight; DP-SGD's guarantee covers the gradients it
clips and noises, not these counts. ``Config.validate`` refuses the combination rather than
release a guarantee that does not hold.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import ConfigError

SCHEMES = ("none", "groups", "groups_labels")


def row_weights(rows: pd.DataFrame, cols: list[str], scheme: str) -> np.ndarray:
    """One weight per row of ``rows`` (the training split) under ``scheme``."""
    missing = [c for c in cols if c not in rows.columns]
    if missing:
        raise ConfigError(f"train.reweight_cols: {missing[0]!r} is not a group column; list it "
                          "in data.group_cols too")
    keys = rows[cols].astype(str)
    n_g = keys.groupby(cols, sort=False)[cols[0]].transform("size")  # each row's group size
    n = len(rows)
    if scheme == "groups":
        k = keys.drop_duplicates().shape[0]
        return (n / (k * n_g)).to_numpy(float)
    if scheme == "groups_labels":
        label = rows["label"].astype(str)
        n_y = label.map(label.value_counts())
        n_gy = keys.assign(_label=label).groupby(cols + ["_label"], sort=False)[
            cols[0]].transform("size")
        return (n_g * n_y / (n * n_gy)).to_numpy(float)
    raise ConfigError(f"train.reweight={scheme!r} is not one of {', '.join(SCHEMES)}")
