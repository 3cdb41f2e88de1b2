"""Predictions are made piece by piece (a file larger than memory can be scored): the table
from small pieces equals the table from one whole read, for CSV, JSONL and text, labelled,
unlabelled and one split; errors that need the whole file still fire across pieces."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import TINY, write_cls_csv, write_lm_txt
from safelm import api
from safelm.api import load_run, predictions_table
from safelm.cli import main
from safelm.errors import DataError, UserError

pytestmark = pytest.mark.usefixtures("one_thread")

WHOLE = {"chunk_rows": 10**9, "chunk_bytes": 1 << 30}
PIECES = {"chunk_rows": 7, "chunk_bytes": 300}  # 120 rows: 18 CSV pieces, ~30 JSONL pieces


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    cls_csv, lm_txt = write_cls_csv(d / "cls.csv"), write_lm_txt(d / "lm.txt")
    sets = [x for s in TINY + ["train.max_steps=3"] for x in ("--set", s)]
    assert main(["train", "--data", str(cls_csv), "--task", "classify", "--user-col", "user",
                 "--out", str(d / "cls"), *sets]) == 0
    assert main(["train", "--data", str(lm_txt), "--out", str(d / "lm"), *sets]) == 0
    return d, load_run(d / "cls", device="cpu"), load_run(d / "lm", device="cpu")


def _jsonl(csv_path, out, drop=()):
    rows = pd.read_csv(csv_path, dtype=str).drop(columns=list(drop))
    out.write_text("".join(json.dumps(r) + "\n" for r in rows.to_dict("records")))
    return out


def _same(run, path, **kw):
    whole = predictions_table(run, path, **kw, **WHOLE)
    pieces = predictions_table(run, path, **kw, **PIECES)
    pd.testing.assert_frame_equal(pieces, whole)
    assert pieces.attrs == whole.attrs
    return whole


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("split", ["all", "test"])
def test_pieces_give_the_whole_reads_table(runs, fmt, split, monkeypatch):
    d, cls, _ = runs
    path = d / "cls.csv" if fmt == "csv" else _jsonl(d / "cls.csv", d / "cls.jsonl")
    seen = []
    encode = api.encode_rows
    monkeypatch.setattr(api, "encode_rows", lambda rows, *a, **k: seen.append(len(rows))
                        or encode(rows, *a, **k))
    table = _same(cls, path, split=split, data_overrides={"group_cols": ["gender"]})
    # the piece-wise call encoded pieces, never the file (planted: the whole read did)
    assert seen[0] == len(table) and len(seen) > 3 and max(seen[1:]) <= 7
    assert table["y_true"].isin(["positive", "negative"]).all()
    if split == "test":  # the user-level split: whole users, the same ones either way
        users = pd.read_csv(d / "cls.csv", dtype=str).set_index("example_id")["user"]
        test_users = set(users[table["example_id"]])
        assert 0 < len(table) < 120
        assert set(users[users.isin(test_users)].index) == set(table["example_id"])
    else:
        assert len(table) == 120


def test_unlabelled_rows_and_a_language_model(runs):
    d, cls, lm = runs
    plain = pd.read_csv(d / "cls.csv", dtype=str).drop(columns="label")
    plain.to_csv(d / "nolabel.csv", index=False)
    unl = _same(cls, d / "nolabel.csv")
    assert (unl["y_true"] == "").all() and unl["nll"].isna().all()
    lab = predictions_table(cls, d / "cls.csv")
    pd.testing.assert_series_equal(unl["y_pred"], lab["y_pred"])  # labels change no input
    _same(cls, _jsonl(d / "cls.csv", d / "nolabel.jsonl", drop=["label"]))
    table = _same(lm, d / "lm.txt")
    assert len(table) == 80 and (table["n_tokens"] > 0).all()


def test_whole_file_errors_fire_across_pieces(runs, monkeypatch):
    d, cls, _ = runs
    rows = pd.read_csv(d / "cls.csv", dtype=str)
    # planted: an id repeated 100 rows later (other pieces)
    rows.loc[110, "example_id"] = rows.loc[10, "example_id"]
    rows.to_csv(d / "dup.csv", index=False)
    for chunking in (WHOLE, PIECES):
        with pytest.raises(DataError, match="appears twice"):
            predictions_table(cls, d / "dup.csv", **chunking)
    # ... as soon as its piece is read (rows 105-111: the 16th of 18 pieces), not at the end
    scored = []
    score = api.score_encoded
    monkeypatch.setattr(api, "score_encoded", lambda *a, **k: scored.append(1) or score(*a, **k))
    with pytest.raises(DataError, match="appears twice"):
        predictions_table(cls, d / "dup.csv", **PIECES)
    assert len(scored) == 15
    # planted: labels only from the 61st record on (JSONL records gain the key)
    labelled = pd.read_csv(d / "cls.csv", dtype=str)
    recs = labelled.drop(columns="label").to_dict("records")
    labelled = labelled.to_dict("records")
    late = d / "late.jsonl"
    late.write_text("".join(json.dumps(r) + "\n" for r in recs[:60] + labelled[60:]))
    for chunking in (WHOLE, PIECES):
        with pytest.raises(DataError, match="no label"):
            predictions_table(cls, late, **chunking)
    # control: unknown labels are named from any piece
    bad = pd.read_csv(d / "cls.csv", dtype=str)
    bad.loc[100, "label"] = "neutral"
    bad.to_csv(d / "bad.csv", index=False)
    with pytest.raises(UserError, match="neutral"):
        predictions_table(cls, d / "bad.csv", **PIECES)
