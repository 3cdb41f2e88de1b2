"""Partitioning oracles: IID sizes, Dirichlet extremes, natural = disjoint users."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from federation import partition
from safelm.errors import UserError


def _rows(n: int = 2000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"label": rng.choice(["neg", "pos", "neu"], n),
                         "gender": rng.choice(["f", "m"], n, p=[0.3, 0.7]),
                         "user": [f"u{i % 97}" for i in range(n)]})


def _mix(client: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """Share of each value per client: [k, n_values]."""
    table = pd.crosstab(client, values).reindex(range(k), fill_value=0).to_numpy(float)
    return table / table.sum(1, keepdims=True)


def test_iid_sizes_differ_by_at_most_one_and_cover_every_row():
    c = partition.iid(1003, 7, seed=1)
    sizes = np.bincount(c, minlength=7)
    assert sizes.sum() == 1003 and sizes.max() - sizes.min() <= 1
    assert np.array_equal(c, partition.iid(1003, 7, seed=1))
    assert not np.array_equal(c, partition.iid(1003, 7, seed=2))


def test_dirichlet_huge_alpha_is_the_global_mix():
    rows = _rows()
    c = partition.dirichlet(rows["label"], 5, alpha=1e6, seed=0)
    glob = rows["label"].value_counts(normalize=True).sort_index().to_numpy()
    assert np.abs(_mix(c, rows["label"], 5) - glob).max() < 0.02


def test_dirichlet_tiny_alpha_gives_each_label_to_one_client():
    rows = _rows()
    c = partition.dirichlet(rows["label"], 3, alpha=1e-3, seed=0)
    # each label lives (almost) entirely on one client
    for v in rows["label"].unique():
        share = np.bincount(c[rows["label"] == v], minlength=3) / (rows["label"] == v).sum()
        assert share.max() > 0.99
    assert np.bincount(c, minlength=3).min() >= 1


def test_dirichlet_over_a_group_column_skews_the_demographic_mix():
    rows = _rows()
    skewed = _mix(partition.dirichlet(rows["gender"], 4, alpha=0.1, seed=3), rows["gender"], 4)
    even = _mix(partition.dirichlet(rows["gender"], 4, alpha=1e4, seed=3), rows["gender"], 4)
    assert skewed[:, 0].max() - skewed[:, 0].min() > 0.5  # some client mostly f, another m
    assert even[:, 0].max() - even[:, 0].min() < 0.05


def test_natural_partition_keeps_users_disjoint_and_whole():
    rows = _rows()
    c = partition.natural(rows["user"], 6, seed=0)
    owners = pd.DataFrame({"user": rows["user"], "c": c}).groupby("user")["c"].nunique()
    assert (owners == 1).all()
    assert set(c) == set(range(6))
    with pytest.raises(UserError, match="user per client"):
        partition.natural(rows["user"][:30].map(lambda u: "u1"), 2, seed=0)


def test_assign_checks_columns_and_report_is_written(tmp_path):
    rows = _rows(300)
    with pytest.raises(UserError, match="region"):
        partition.assign(rows, "dirichlet-group", 3, 0, column="region")
    c = partition.assign(rows, "dirichlet-label", 3, 0, alpha=0.5)
    table = partition.partition_table(c, rows, ["label", "gender"], 3)
    assert table["rows"].sum() == 300
    assert (table[[f"label={v}" for v in ("neg", "neu", "pos")]].sum(axis=1) == table["rows"]).all()
    csv, png = partition.write_partition_report(table, tmp_path)
    assert pd.read_csv(csv).equals(table) and png.stat().st_size > 1000
