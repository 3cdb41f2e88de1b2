"""safelm explain: integrated gradients checked against oracles (completeness; a classifier
whose label is exactly "contains the planted word"), the deletion test of faithfulness, and
the bad-input exits."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY

pytest.importorskip("captum")
pytestmark = pytest.mark.usefixtures("one_thread")

FILL = ["the", "film", "was", "long", "and", "food", "came", "late", "we", "saw", "a", "show",
        "today", "it", "rained"]
PLANTED = "zebra"


def write_planted(path: Path, n: int = 300, seed: int = 0) -> Path:
    """label 'yes' exactly when the text contains the planted word."""
    rng, coins = random.Random(seed), random.Random(seed + 1)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["example_id", "text", "label", "grp", "coin"])
        for i in range(n):
            words = [rng.choice(FILL) for _ in range(rng.randint(3, 6))]
            has = rng.random() < 0.5
            if has:
                words.insert(rng.randrange(len(words) + 1), PLANTED)
            # grp: a group defined by the planted word; coin: a group unrelated to anything
            w.writerow([f"r{i}", " ".join(words), "yes" if has else "no", "z" if has else "o",
                        coins.choice("ht")])
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from safelm.api import load_run, train_run
    from safelm.config import Config
    d = tmp_path_factory.mktemp("planted")
    data = write_planted(d / "planted.csv")
    cfg = Config.load(None, TINY + ["model.block_size=32", "train.epochs=4", "train.lr=2e-3",
                                    "model.dropout=0.0"])
    cfg.train.task = "classify"
    cfg.validate()
    train_run(data, cfg, d / "run")
    return d / "run", data, load_run(d / "run", device="cpu")


def _texts(data: Path, n: int, label: str) -> list[dict[str, str]]:
    with open(data, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["label"] == label]
    return [{"id": r["example_id"], "text": r["text"]} for r in rows[-n:]]  # test-ish tail


@pytest.mark.slow
def test_completeness_and_planted_word_ranks_first(planted):
    from audits.explain.compute import ExplainSettings, explain_rows
    _, data, run = planted
    recs = explain_rows(run, _texts(data, 8, "yes"), "yes", ExplainSettings(attention=False))
    top = []
    from safelm.explain import class_probs
    yes = list(run.cfg.data.labels).index("yes")
    for r in recs:
        total = sum(r["attributions"])
        # completeness: the attributions add up to f(x) - f(baseline), both computed here by
        # plain forward passes, within the reported delta
        ids = r["ids"]
        fx, fb = class_probs(run, [ids, [ids[0]] + [run.tokenizer.pad_id] * (len(ids) - 1)]
                             )[:, yes]
        assert abs(total - (fx - fb)) <= r["convergence_delta"] + 1e-4
        assert r["convergence_delta"] <= 0.05 * abs(r["score"] - r["f_baseline"]) + 1e-3
        assert r["attributions"][0] == 0.0  # <bos> is kept in the baseline
        top.append(max(r["words"], key=lambda w: w["attribution"])["word"])
    assert sum(w == PLANTED for w in top) >= 7, top


@pytest.mark.slow
def test_control_rows_rank_no_word_consistently(planted):
    """Rows without the planted word, explained for their predicted class ('no'): no word
    stands in for Z: the top word varies from row to row, and no control word gets
    anything like the weight Z gets in rows with it."""
    from audits.explain.compute import ExplainSettings, explain_rows
    _, data, run = planted
    yes = explain_rows(run, _texts(data, 4, "yes"), None, ExplainSettings(attention=False))
    no = explain_rows(run, _texts(data, 8, "no"), None, ExplainSettings(attention=False))
    assert all(r["predicted"] == "no" for r in no)
    z = np.mean([sum(w["attribution"] for w in r["words"] if w["word"] == PLANTED)
                 for r in yes])
    assert np.mean([max(abs(w["attribution"]) for w in r["words"]) for r in no]) < 0.5 * z
    tops = [max(r["words"], key=lambda w: w["attribution"])["word"] for r in no]
    assert max(tops.count(t) for t in set(tops)) <= len(tops) // 2, tops


@pytest.mark.slow
def test_cli_writes_report_and_faithfulness_passes(planted, tmp_path):
    from safelm.cli import main
    run_dir, data, _ = planted
    ids = [r["id"] for r in _texts(data, 10, "yes")] + [r["id"] for r in _texts(data, 4, "no")]
    assert main(["explain", str(run_dir), "--data", str(data), "--rows", ",".join(ids),
                 "--out", str(tmp_path / "x"), "--draws", "10"]) == 0
    ex = json.loads((tmp_path / "x" / "explanations.json").read_text())
    assert [r["id"] for r in ex["rows"]] == ids
    row = ex["rows"][0]
    assert len(row["tokens"]) == len(row["attributions"]) == len(row["token_ids"])
    assert np.asarray(row["attention"]).shape[:2] == (1, 2)  # [layer, head, position]
    assert abs(sum(np.asarray(row["attention"])[0, 0]) - 1) < 1e-5
    rep = json.loads((tmp_path / "x" / "report.json").read_text())
    f = rep["faithfulness"]
    assert f["passed"] and f["top_k_drop_mean"] > f["random_drop_mean"]
    assert f["fraction_top_beats_random"] >= 0.7 and f["wilcoxon_p"] < 0.05
    html = (tmp_path / "x" / "report.html").read_text()
    assert "data:image/png;base64," in html and PLANTED in html
    assert "faithfulness" in (tmp_path / "x" / "report.md").read_text()


def test_lm_run_exits_2_with_the_fix(tmp_path, lm_txt, capsys):
    from safelm.cli import main
    assert main(["train", "--data", str(lm_txt), "--task", "lm", "--out", str(tmp_path / "lm"),
                 "--set", "train.max_steps=1", *sum((["--set", s] for s in TINY), [])]) == 0
    capsys.readouterr()
    rc = main(["explain", str(tmp_path / "lm"), "--data", str(lm_txt), "--out",
               str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "language-model run" in err[0] and "--task classify" in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_unknown_rows_exit_2(planted, tmp_path, capsys):
    from safelm.cli import main
    run_dir, data, _ = planted
    rc = main(["explain", str(run_dir), "--data", str(data), "--rows", "r1,nope,zz",
               "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nope" in err[0] and "zz" in err[0]
    assert not (tmp_path / "x").exists()


def test_missing_captum_exits_2_naming_the_extra(monkeypatch, tmp_path, capsys):
    from safelm.cli import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "captum" else real(name, *a, **k))
    rc = main(["explain", str(tmp_path / "run"), "--data", str(tmp_path / "d.csv"), "--out",
               str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install 'safelm[explain]'" in err[0]


@pytest.mark.slow
def test_fairness_explain_points_at_the_planted_word(planted, tmp_path, capsys):
    """A group defined by the planted word is flagged (selection rate ~1 vs ~0.5); the word
    that most separates its attributions from the rest's is the planted word."""
    from safelm.api import load_run, predictions_table, write_csv
    from safelm.cli import main
    run_dir, data, _ = planted
    preds = tmp_path / "p.csv"
    write_csv(predictions_table(load_run(run_dir, device="cpu"), data, split="test",
                                data_overrides={"group_cols": ["grp", "coin"]}), preds)
    assert main(["audit", "fairness", "--predictions", str(preds), "--sensitive", "grp",
                 "--out", str(tmp_path / "a"), "--n-boot", "50", "--explain", str(run_dir),
                 "--data", str(data), "--explain-rows", "16"]) == 0
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    ex = rep["explanations"]
    z = next(g for g in ex["groups"] if g["group"] == {"grp": "z"})
    assert z["top_words"][0]["word"] == PLANTED and z["top_words"][0]["difference"] > 0
    assert ex["faithfulness"]["rows"] > 0
    assert "What drives the flagged groups" in (tmp_path / "a" / "report.html").read_text()
    assert PLANTED in capsys.readouterr().out
    # an unrelated group: nothing flagged, and the report says so
    assert main(["audit", "fairness", "--predictions", str(preds), "--sensitive", "coin",
                 "--out", str(tmp_path / "b"), "--n-boot", "50", "--explain", str(run_dir),
                 "--data", str(data)]) == 0
    ex = json.loads((tmp_path / "b" / "report.json").read_text())["explanations"]
    assert ex["groups"] == [] and "no group is flagged" in ex["note"]


def test_fairness_explain_needs_data(tmp_path, capsys):
    from safelm.cli import main
    rc = main(["audit", "fairness", "--predictions", str(tmp_path / "p.csv"), "--sensitive",
               "g", "--out", str(tmp_path / "a"), "--explain", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--data" in err[0]
