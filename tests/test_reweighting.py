"""In-training fairness mitigation (train.reweight): weights against an independent count,
the weighted loss against a per-row computation, refusals, and the planted bias it removes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from safelm import corpus
from safelm.cli import main
from safelm.config import Config
from safelm.errors import ConfigError
from safelm.reweighting import row_weights
from safelm.trainer import batch_loss

from conftest import TINY


def _rows(n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = rng.choice(["a", "b", "c"], n, p=[0.6, 0.3, 0.1])
    h = rng.choice(["x", "y"], n)
    p_pos = np.where(g == "c", 0.2, 0.6)  # a label bias against group c
    y = np.where(rng.random(n) < p_pos, "pos", "neg")
    return pd.DataFrame({"g": g, "h": h, "label": y})


def test_groups_labels_makes_group_and_label_independent():
    rows = _rows()
    w = row_weights(rows, ["g", "h"], "groups_labels")
    assert abs(w.mean() - 1) < 1e-12
    cell = rows["g"] + "*" + rows["h"]
    total = w.sum()
    for c in cell.unique():  # weighted P(g, y) == weighted P(g) * weighted P(y), every cell
        in_c = (cell == c).to_numpy()
        for y in ("pos", "neg"):
            is_y = (rows["label"] == y).to_numpy()
            joint = w[in_c & is_y].sum() / total
            assert joint == pytest.approx(w[in_c].sum() / total * w[is_y].sum() / total)
            # and the weighted marginals are the unweighted ones
            assert w[in_c].sum() / total == pytest.approx(in_c.mean())


def test_groups_gives_every_group_the_same_total_weight():
    rows = _rows()
    w = row_weights(rows, ["g"], "groups")
    assert abs(w.mean() - 1) < 1e-12
    totals = [w[(rows["g"] == g).to_numpy()].sum() for g in ("a", "b", "c")]
    assert totals == pytest.approx([len(rows) / 3] * 3)


def test_weights_follow_the_planted_bias_and_not_the_clean_corpus():
    """Reweighing upweights the biased group's (rare) positive labels; on the bias-free
    variant of the same corpus the weights stay near 1."""
    cols = ["gender", "age_group"]
    for bias, lo, hi in ((0.8, 2.0, None), (0.0, None, 1.25)):
        df = corpus.sentiment_corpus(n=6000, bias=bias)
        train = df[df["split"] == "train"].reset_index(drop=True)
        w = row_weights(train, cols, "groups_labels")
        target = ((train["gender"] == "female") & (train["age_group"] == "old")
                  & (train["label"] == "positive")).to_numpy()
        if lo is not None:
            assert w[target].min() > lo
        if hi is not None:
            assert np.abs(w - 1).max() < hi - 1


def test_weighted_batch_loss_matches_per_row_losses():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)

    def clf(x, lengths):
        return model(x.float())
    x = torch.randn(5, 4)
    labels = torch.tensor([0, 2, 1, 1, 0])
    w = torch.tensor([0.5, 2.0, 1.0, 0.0, 1.5])
    batch = (x, torch.zeros(5, 0), torch.ones(5, dtype=torch.long), labels, w)
    loss, n = batch_loss(clf, batch, "classify")
    with torch.no_grad():
        expect = sum(float(w[i]) * float(F.cross_entropy(model(x[i:i + 1]), labels[i:i + 1]))
                     for i in range(5)) / 5
    assert n == 5 and float(loss.detach()) == pytest.approx(expect, rel=1e-6)
    unweighted, _ = batch_loss(clf, batch[:4], "classify")
    assert float(unweighted.detach()) != pytest.approx(expect, rel=1e-3)


@pytest.mark.parametrize("sets,needle", [
    (["train.reweight=groups"], "needs group columns"),
    (["train.reweight=maybe", "data.group_cols=gender"], "is not one of"),
    (["train.reweight=groups", "data.group_cols=gender", "train.reweight_cols=age"],
     "not in data.group_cols"),
    (["train.reweight=groups_labels", "data.group_cols=gender", "train.task=lm"],
     "train.task=classify"),
    (["train.reweight=groups", "data.group_cols=gender", "privacy.enabled=true",
      "privacy.target_epsilon=3"], "DP-SGD does not protect"),
])
def test_bad_reweight_options_are_refused(sets, needle):
    with pytest.raises(ConfigError, match=needle):
        Config.load(None, sets).validate()


def test_cli_refuses_reweight_with_dp_in_one_line(cls_csv, tmp_path, capsys):
    rc = main(["train", "--data", str(cls_csv), "--task", "classify", "--out",
               str(tmp_path / "run"), "--set", "data.group_cols=gender", "--set",
               "train.reweight=groups", "--set", "privacy.enabled=true", "--set",
               "privacy.target_epsilon=3"] + [a for s in TINY for a in ("--set", s)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def _train_and_predict(data: Path, out: Path, mode: str) -> Path:
    from safelm.api import load_run, predictions_table, train_run, write_csv
    cfg = Config.load(None, ["model.n_layer=1", "model.d_model=32", "model.n_head=2",
                             "model.block_size=32", "model.vocab_size=400", "train.epochs=5",
                             "train.lr=3e-3", "train.batch_size=64", "train.warmup_steps=10",
                             "train.task=classify", "train.progress=off",
                             "data.group_cols=gender,age_group", f"train.reweight={mode}"])
    train_run(data, cfg, out / mode)
    path = out / f"{mode}.csv"
    write_csv(predictions_table(load_run(out / mode), data, split="test"), path)
    return path


@pytest.mark.slow
def test_reweighing_removes_the_planted_bias_and_the_audit_shows_before_after(tmp_path):
    """Planted: 80% of old women's positive train labels flipped. Without mitigation the
    model predicts positive less often for them (on clean test labels); reweighing narrows
    that gap, and `safelm audit fairness --unmitigated` reports it with the accuracy cost."""
    data = tmp_path / "s.csv"
    corpus.write_sentiment_csv(data, n=6000, bias=0.8)
    before = _train_and_predict(data, tmp_path, "none")
    after = _train_and_predict(data, tmp_path, "groups_labels")

    def gap(path: Path) -> float:
        t = pd.read_csv(path)
        old_f = (t["gender"] == "female") & (t["age_group"] == "old")
        pos = t["y_pred"] == "positive"
        return float(pos[~old_f].mean() - pos[old_f].mean())
    assert gap(before) > 0.05, gap(before)  # the planted bias is learned ...
    assert gap(after) < gap(before) / 2, (gap(before), gap(after))  # ... and mostly undone

    rc = main(["audit", "fairness", "--predictions", str(after), "--unmitigated", str(before),
               "--sensitive", "gender,age_group", "--out", str(tmp_path / "audit"),
               "--n-boot", "200", "--mitigation-method", "train.reweight=groups_labels"])
    assert rc == 0
    rep = json.loads((tmp_path / "audit" / "report.json").read_text())
    (m,) = rep["mitigation"]
    assert m["constraint"] == "in_training" and m["rows_paired"] == len(pd.read_csv(after))
    dp = m["disparities"]["demographic_parity_difference"]
    assert dp["after"]["value"] < dp["before"]["value"]
    t_a, t_b = pd.read_csv(after), pd.read_csv(before)
    assert m["overall"]["accuracy"]["after"]["value"] == pytest.approx(
        (t_a["y_pred"] == t_a["y_true"]).mean())
    assert m["overall"]["accuracy"]["before"]["value"] == pytest.approx(
        (t_b["y_pred"] == t_b["y_true"]).mean())
    assert "In training: train.reweight=groups_labels" in (
        tmp_path / "audit" / "report.html").read_text()
