"""Tabular rows as text (``data.text_cols`` / ``--text-cols``).

Oracles: the expected texts are written out by hand here (never produced by the code under
test); a run's predictions on a table equal its predictions on the same rows given as
pre-rendered text; a model whose text leaves a column out gives bit-identical predictions
when only that column changes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest

from safelm.cli import main
from safelm.config import Config, DataConfig
from safelm.data import load_rows
from safelm.errors import ConfigError

from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

SETS = [x for s in [*TINY, "model.block_size=32", "train.epochs=1", "train.device=cpu",
                    "train.checkpoint_every=100000"] for x in ("--set", s)]


def _cli(capsys, *args):
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(rc, err, *needles):
    assert rc == 2, (rc, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


# ---- the text format --------------------------------------------------------------------
TRICKY_CSV = ('id,age,job,income,note,label\n'
              'r0,34,engineer,52000.0,plain,yes\n'
              'r1,3.50,"a|b",,"two\nlines  here",no\n'
              'r2,007,  nurse ,1e3,   ,no\n')


def test_exact_text_for_a_few_rows(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(TRICKY_CSV, encoding="utf-8")
    cfg = DataConfig(id_col="id", text_cols=["age", "job", "income", "note"])
    rows = load_rows(p, cfg, "classify")
    assert list(rows["text"]) == [
        "age: 34 | job: engineer | income: 52000 | note: plain",
        "age: 3.5 | job: a\u00a6b | income: <missing> | note: two lines here",
        "age: 007 | job: nurse | income: 1e3 | note: <missing>",
    ]
    assert list(rows["label"]) == ["yes", "no", "no"]


def test_order_given_is_order_used_and_stable(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(TRICKY_CSV, encoding="utf-8")
    a = load_rows(p, DataConfig(id_col="id", text_cols=["job", "age"]), "classify")
    b = load_rows(p, DataConfig(id_col="id", text_cols=["job", "age"]), "classify")
    c = load_rows(p, DataConfig(id_col="id", text_cols=["age", "job"]), "classify")
    assert a["text"][0] == "job: engineer | age: 34"
    assert c["text"][0] == "age: 34 | job: engineer"
    assert list(a["text"]) == list(b["text"])
    # the file's own column order does not matter, only the order given
    df = pd.read_csv(p, dtype=str, keep_default_na=False)
    q = tmp_path / "reordered.csv"
    df[["label", "job", "note", "id", "income", "age"]].to_csv(q, index=False)
    d = load_rows(q, DataConfig(id_col="id", text_cols=["job", "age"]), "classify")
    assert list(d["text"]) == list(a["text"])


def test_jsonl_numbers_and_nulls_match_the_csv(tmp_path):
    p = tmp_path / "t.jsonl"
    recs = [{"age": 34, "income": 52000.0, "ok": True, "tags": ["x", "y"], "label": "yes"},
            {"age": 3.5, "income": None, "ok": False, "tags": [], "label": "no"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    rows = load_rows(p, DataConfig(text_cols=["age", "income", "ok", "tags"]), "classify")
    assert list(rows["text"]) == ["age: 34 | income: 52000 | ok: true | tags: [\"x\",\"y\"]",
                                  "age: 3.5 | income: <missing> | ok: false | tags: []"]


def test_config_rejects_duplicate_or_empty_names():
    with pytest.raises(ConfigError, match="'a' twice"):
        Config.load(None, ["data.text_cols=a,b,a"])
    with pytest.raises(ConfigError, match="empty column name"):
        Config.from_dict({"data": {"text_cols": ["a", " "]}}).validate()
    assert Config.load(None, ["data.text_cols=b,a"]).data.text_cols == ["b", "a"]


# ---- bad input: exit 2, one line, nothing written ----------------------------------------
def _table(path: Path, n: int, seed: int = 0) -> Path:
    """A table where the label depends on a categorical feature and on the sensitive column.

    ``yes`` iff job is engineer or sex is f: a model that reads ``sex`` can be right on every
    row, one that cannot is wrong on female non-engineers (about a quarter of the rows).
    ``age`` is noise."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        job, sex = rng.choice(["engineer", "clerk"]), rng.choice(["f", "m"])
        rows.append({"id": f"p{i}", "age": rng.randint(20, 60), "job": job, "sex": sex,
                     "label": "yes" if job == "engineer" or sex == "f" else "no"})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_text_col_and_text_cols_conflict(capsys, tmp_path):
    data = _table(tmp_path / "t.csv", 20)
    for cmd in (["train", "--data", data, "--out", tmp_path / "run", "--task", "classify"],
                ["predict", tmp_path / "run", "--data", data, "--out", tmp_path / "p.csv"]):
        rc, _, err = _cli(capsys, *cmd, "--text-col", "job", "--text-cols", "age,job")
        _one_error_line(rc, err, "--text-col", "--text-cols")
    assert sorted(tmp_path.iterdir()) == [data]
    rc, _, err = _cli(capsys, "audit", "privacy", tmp_path / "run", "--members", data,
                      "--non-members", data, "--out", tmp_path / "aud", "--text-col", "job",
                      "--text-cols", "age,job")
    _one_error_line(rc, err, "--text-col", "--text-cols")
    assert sorted(tmp_path.iterdir()) == [data]


def test_missing_column_names_it_and_writes_nothing(capsys, tmp_path):
    data = _table(tmp_path / "t.csv", 20)
    rc, _, err = _cli(capsys, "train", "--data", data, "--out", tmp_path / "run", "--task",
                      "classify", "--text-cols", "age,salary", "--set", "data.id_col=id")
    _one_error_line(rc, err)
    assert err == (f"error: --text-cols names column 'salary', which {data} lacks; its "
                   "columns are: id, age, job, sex, label\n")
    assert sorted(tmp_path.iterdir()) == [data]


def test_label_column_in_text_is_refused(capsys, tmp_path):
    data = _table(tmp_path / "t.csv", 20)
    rc, _, err = _cli(capsys, "train", "--data", data, "--out", tmp_path / "run", "--task",
                      "classify", "--text-cols", "job,label")
    _one_error_line(rc, err, "'label'", "--text-cols")
    rc, _, err = _cli(capsys, "train", "--data", data, "--out", tmp_path / "run", "--task",
                      "classify", "--text-cols", "job,,job")
    _one_error_line(rc, err, "'job' twice")
    assert sorted(tmp_path.iterdir()) == [data]


# ---- a run records text_cols; predict rebuilds the same texts -----------------------------
@pytest.fixture(scope="module")
def tab_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("tab")
    data = _table(d / "t.csv", 60)
    assert main(["train", "--data", str(data), "--out", str(d / "run"), "--task", "classify",
                 "--text-cols", "job,age", "--group-cols", "sex", "--set", "data.id_col=id",
                 *SETS]) == 0
    return d, data


def test_run_records_text_cols_and_predict_reuses_them(capsys, tab_run):
    d, data = tab_run
    cfg = json.loads((d / "run" / "config.json").read_text())
    assert cfg["data"]["text_cols"] == ["job", "age"]
    assert _cli(capsys, "predict", d / "run", "--data", data, "--out", d / "a.csv")[0] == 0
    # the oracle: the same rows as pre-rendered text, read with --text-col
    df = pd.read_csv(data, dtype=str)
    pre = pd.DataFrame({"id": df["id"], "sex": df["sex"], "label": df["label"],
                        "rendered": [f"job: {j} | age: {a}" for j, a in zip(df["job"],
                                                                           df["age"])]})
    pre.to_csv(d / "pre.csv", index=False)
    assert _cli(capsys, "predict", d / "run", "--data", d / "pre.csv", "--text-col",
                "rendered", "--out", d / "b.csv")[0] == 0
    a, b = pd.read_csv(d / "a.csv"), pd.read_csv(d / "b.csv")
    assert list(a.columns) == list(b.columns) and "sex" in a.columns
    pd.testing.assert_frame_equal(a, b)
    # another order is another text: given explicitly, it is used (and scores differ)
    assert _cli(capsys, "predict", d / "run", "--data", data, "--text-cols", "age,job",
                "--out", d / "c.csv")[0] == 0
    assert not pd.read_csv(d / "c.csv")["nll"].equals(a["nll"])


def test_predict_missing_column_writes_nothing(capsys, tab_run):
    d, data = tab_run
    df = pd.read_csv(data, dtype=str).drop(columns="age")
    df.to_csv(d / "noage.csv", index=False)
    rc, _, err = _cli(capsys, "predict", d / "run", "--data", d / "noage.csv", "--out",
                      d / "never.csv")
    _one_error_line(rc, err, "--text-cols names column 'age'", "id, job, sex, label")
    assert not (d / "never.csv").exists() and not (d / "never.csv.meta.json").exists()


# ---- the sensitive column in the text, or left out and audited as a group ----------------
@pytest.mark.slow
def test_sensitive_column_in_text_or_only_as_audit_group(capsys, tmp_path):
    data = _table(tmp_path / "t.csv", 400, seed=1)
    flipped = pd.read_csv(data, dtype=str)
    flipped["sex"] = flipped["sex"].map({"f": "m", "m": "f"})
    flipped["label"] = ""  # unlabelled rows: predictions only
    flipped.drop(columns="label").to_csv(tmp_path / "flipped.csv", index=False)
    sets = [x for s in [*TINY, "model.block_size=32", "train.epochs=6", "train.lr=3e-3",
                        "train.device=cpu", "train.checkpoint_every=100000",
                        "data.id_col=id", "data.val_frac=0.0"] for x in ("--set", s)]
    acc, changed = {}, {}
    for name, cols in (("with", "job,age,sex"), ("without", "job,age")):
        run = tmp_path / name
        assert _cli(capsys, "train", "--data", data, "--out", run, "--task", "classify",
                    "--text-cols", cols, "--group-cols", "sex", *sets)[0] == 0
        assert _cli(capsys, "predict", run, "--data", data, "--split", "test",
                    "--out", tmp_path / f"{name}.csv")[0] == 0
        assert _cli(capsys, "predict", run, "--data", data, "--out",
                    tmp_path / f"{name}_all.csv")[0] == 0
        assert _cli(capsys, "predict", run, "--data", tmp_path / "flipped.csv", "--out",
                    tmp_path / f"{name}_flip.csv")[0] == 0
        rc, out, err = _cli(capsys, "audit", "fairness", "--predictions",
                            tmp_path / f"{name}.csv", "--sensitive", "sex", "--n-boot", "200",
                            "--min-group-size", "5", "--out", tmp_path / f"audit_{name}")
        assert rc == 0, err
        rep = json.loads((tmp_path / f"audit_{name}" / "report.json").read_text())
        assert {e["group"]["sex"] for e in rep["by_group"]} == {"f", "m"}
        t = pd.read_csv(tmp_path / f"{name}.csv")
        acc[name] = float((t["y_true"] == t["y_pred"]).mean())
        a, f = pd.read_csv(tmp_path / f"{name}_all.csv"), pd.read_csv(tmp_path / f"{name}_flip.csv")
        changed[name] = float((a["y_pred"] != f["y_pred"]).mean())
    # left out: the text of a row does not depend on sex, so flipping it changes nothing
    assert changed["without"] == 0.0
    # in the text: the model uses it (female clerks are "yes" only through sex)
    assert changed["with"] > 0.3, changed  # measured 0.51 (half the rows are clerks)
    assert acc["with"] > acc["without"], acc  # measured 1.0 vs 0.675 (at most 0.75)


@pytest.mark.slow
def test_release_card_names_the_text_columns(capsys, tab_run):
    d, _ = tab_run
    rc, _, err = _cli(capsys, "release", d / "run", "--out", d / "rel")
    assert rc == 0, err
    card = (d / "rel" / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert ("model input: the columns job, age as 'column: value | ...' text (in this order)"
            in card)
    rel = json.loads((d / "rel" / "release.json").read_text(encoding="utf-8"))
    assert rel["data"]["columns"]["text_cols"] == ["job", "age"]
    assert rel["data"]["columns"]["groups"] == ["sex"]
