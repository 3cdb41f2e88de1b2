"""Reading, splitting and encoding data: every format, every DataError, split and block oracles."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from safelm.config import DataConfig
from safelm.data import encode_rows, load_rows, read_table, split_rows
from safelm.errors import DataError, UserError


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# ---- reading each format ----------------------------------------------------------------------
def test_csv(tmp_path):
    p = write(tmp_path / "d.csv", 'text,label\nhello world,pos\n"a, quoted ""x""",neg\nNA,pos\n')
    rows = load_rows(p, cfg(), "classify")
    assert list(rows["text"]) == ["hello world", 'a, quoted "x"', "NA"]  # NA stays a string
    assert list(rows["label"]) == ["pos", "neg", "pos"]
    assert list(rows["example_id"]) == ["0", "1", "2"]  # generated row numbers


def test_tsv(tmp_path):
    p = write(tmp_path / "d.tsv", "text\tlabel\nhas, comma\tpos\nsecond\tneg\n")
    rows = load_rows(p, cfg(), "classify")
    assert list(rows["text"]) == ["has, comma", "second"]
    assert list(rows["label"]) == ["pos", "neg"]


def test_csv_with_bom_and_id_column(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes("\ufeffexample_id,text\nx7,héllo\nx9,wörld\n".encode("utf-8"))
    rows = load_rows(p, cfg(), "lm")
    assert list(rows["example_id"]) == ["x7", "x9"]
    assert list(rows["text"]) == ["héllo", "wörld"]


def test_jsonl(tmp_path):
    lines = [{"text": "one", "label": "a", "id": 5}, {"text": "two 🙂", "label": "b", "id": 6}]
    p = write(tmp_path / "d.jsonl", "\n".join(json.dumps(o) for o in lines) + "\n\n")
    rows = load_rows(p, cfg(id_col="id"), "classify")
    assert list(rows["text"]) == ["one", "two 🙂"]
    assert list(rows["label"]) == ["a", "b"]
    assert list(rows["example_id"]) == ["5", "6"]


def test_txt_lines_mode(tmp_path):
    p = write(tmp_path / "d.txt", "first line\n  second line  \nthird\n")
    rows = load_rows(p, cfg(), "lm")  # auto, no blank lines -> lines
    assert list(rows["text"]) == ["first line", "second line", "third"]
    forced = load_rows(p, cfg(text_mode="running"), "lm")  # control: forced running = 1 paragraph
    assert list(forced["text"]) == ["first line second line third"]


def test_txt_running_mode_auto_detected(tmp_path):
    p = write(tmp_path / "d.txt", "Once upon\na time.\n\nThe end\nof it.\n\n\nCoda.\n")
    rows = load_rows(p, cfg(), "lm")
    assert list(rows["text"]) == ["Once upon a time.", "The end of it.", "Coda."]
    forced = load_rows(p, cfg(text_mode="lines"), "lm")  # control: forced lines mode
    assert list(forced["text"]) == ["Once upon", "a time.", "The end", "of it.", "Coda."]


def test_txt_custom_text_col(tmp_path):
    p = write(tmp_path / "d.txt", "a\nb\n")
    rows = load_rows(p, cfg(text_col="body"), "lm")
    assert list(rows["text"]) == ["a", "b"]


@pytest.mark.parametrize("raw", [b"one a\r\ntwo\r\n\r\nthree\r\n", b"one a\ntwo\n   \nthree\n"])
def test_txt_running_mode_crlf_and_whitespace_blank_lines(tmp_path, raw):
    p = tmp_path / "d.txt"
    p.write_bytes(raw)
    rows = load_rows(p, cfg(), "lm")
    assert list(rows["text"]) == ["one a two", "three"]


def test_format_override(tmp_path):
    p = write(tmp_path / "data.dat", "text\nx\ny\n")
    with pytest.raises(DataError):
        read_table(p, cfg())
    assert list(read_table(p, cfg(format="csv"))["text"]) == ["x", "y"]


# ---- DataError cases ---------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file") as e:
        load_rows(tmp_path / "nope.csv", cfg(), "lm")
    assert "nope.csv" in str(e.value)


def test_directory(tmp_path):
    d = tmp_path / "dir.csv"
    d.mkdir()
    with pytest.raises(DataError, match="is a directory"):
        load_rows(d, cfg(), "lm")


@pytest.mark.parametrize("name", ["data.xlsx", "data"])
def test_unknown_extension(tmp_path, name):
    p = write(tmp_path / name, "text\nx\n")
    with pytest.raises(DataError, match="unknown format") as e:
        load_rows(p, cfg(), "lm")
    assert "data.format" in str(e.value)


def test_missing_column_suggests(tmp_path):
    p = write(tmp_path / "d.csv", "txt,labels\nhello,pos\n")
    with pytest.raises(DataError) as e:
        load_rows(p, cfg(), "lm")
    msg = str(e.value)
    assert "no column 'text'" in msg and "did you mean 'txt'?" in msg and "--text-col" in msg
    with pytest.raises(DataError) as e:
        load_rows(p, cfg(text_col="txt"), "classify")
    assert "no column 'label'" in str(e.value) and "did you mean 'labels'?" in str(e.value)
    # control: nothing close -> no suggestion, but the columns are listed
    with pytest.raises(DataError) as e:
        load_rows(p, cfg(text_col="zzzz"), "lm")
    assert "did you mean" not in str(e.value) and "txt, labels" in str(e.value)


@pytest.mark.parametrize("name, body", [
    ("d.csv", "text,label\n"),  # header only
    ("d.csv", ""),  # nothing at all
    ("d.jsonl", ""),
    ("d.jsonl", "\n  \n"),
    ("d.txt", ""),
    ("d.txt", "\n\n  \n"),
])
def test_empty_file(tmp_path, name, body):
    p = write(tmp_path / name, body)
    with pytest.raises(DataError, match="no examples"):
        load_rows(p, cfg(), "lm")


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl", "d.txt"])
def test_non_utf8_names_line(tmp_path, name):
    good = {"d.csv": [b"text", b"fine"], "d.jsonl": [b'{"text": "a"}', b'{"text": "b"}'],
            "d.txt": [b"one", b"two"]}[name]
    bad = b'{"text": "caf\xe9"}' if name == "d.jsonl" else b"caf\xe9"
    p = tmp_path / name
    p.write_bytes(b"\n".join(good + [bad, good[-1]]) + b"\n")
    with pytest.raises(DataError) as e:
        load_rows(p, cfg(), "lm")
    msg = str(e.value)
    assert "line 3 " in msg and "UTF-8" in msg and "0xe9" in msg


def test_non_utf8_control_line_1(tmp_path):
    p = tmp_path / "d.txt"
    p.write_bytes(b"\xff\nok\n")
    with pytest.raises(DataError, match="line 1 "):
        load_rows(p, cfg(), "lm")


def test_jsonl_bad_line(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": oops}\n{"text": "c"}\n')
    with pytest.raises(DataError) as e:
        load_rows(p, cfg(), "lm")
    assert "line 3 is not valid JSON" in str(e.value)


@pytest.mark.parametrize("value", ['["a", "b"]', '"just a string"', "42", "null"])
def test_jsonl_not_an_object(tmp_path, value):
    p = write(tmp_path / "d.jsonl", '{"text": "a"}\n' + value + "\n")
    with pytest.raises(DataError) as e:
        load_rows(p, cfg(), "lm")
    assert "line 2 is JSON but not an object" in str(e.value)


def test_missing_label_names_row(tmp_path):
    p = write(tmp_path / "d.csv", "text,label\na,pos\nb,neg\nc,  \nd,\n")
    with pytest.raises(DataError) as e:
        load_rows(p, cfg(), "classify")
    msg = str(e.value)
    assert "2 row(s) have no label" in msg and "first: row 3" in msg
    # control: the same file is fine for a language model
    assert len(load_rows(p, cfg(), "lm")) == 4


def test_missing_label_jsonl_null(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n')
    with pytest.raises(DataError, match="first: row 2"):
        load_rows(p, cfg(), "classify")


def test_duplicate_example_ids(tmp_path):
    p = write(tmp_path / "d.csv", "example_id,text\n1,a\n2,b\n1,c\n")
    with pytest.raises(DataError) as e:
        load_rows(p, cfg(), "lm")
    assert "example id '1' appears twice" in str(e.value)


def test_bad_split_values(tmp_path):
    p = write(tmp_path / "d.csv", "text,split\na,train\nb,Validation\nc,TEST\n")
    with pytest.raises(DataError) as e:
        load_rows(p, cfg(), "lm")
    msg = str(e.value)
    assert "'validation'" in msg and "train, val, test" in msg
    # control: case and spaces are normalised, and split_col= ignores the column
    p2 = write(tmp_path / "ok.csv", "text,split\na,train\nb, Val \nc,TEST\n")
    assert list(load_rows(p2, cfg(), "lm")["split"]) == ["train", "val", "test"]
    assert "split" not in load_rows(p, cfg(split_col=""), "lm").columns


def test_missing_user_names_row(tmp_path):
    p = write(tmp_path / "d.csv", "text,author\na,u1\nb,\n")
    with pytest.raises(DataError, match="row 2 has no user"):
        load_rows(p, cfg(user_col="author"), "lm")


def test_empty_group_becomes_unknown_or_errors(tmp_path):
    p = write(tmp_path / "d.csv", "text,gender,age\na,f,30s\nb,,40s\nc,m, \n")
    rows = load_rows(p, cfg(group_cols=["gender", "age"]), "lm")
    assert list(rows["gender"]) == ["f", "unknown", "m"]
    assert list(rows["age"]) == ["30s", "40s", "unknown"]
    with pytest.raises(DataError) as e:
        load_rows(p, cfg(group_cols=["gender", "age"], empty_group="error"), "lm")
    assert "row 2" in str(e.value) and "'gender'" in str(e.value)
    # control: with no empty values, empty_group=error reads fine
    q = write(tmp_path / "full.csv", "text,gender\na,f\nb,m\n")
    assert list(load_rows(q, cfg(group_cols=["gender"], empty_group="error"), "lm")["gender"]) \
        == ["f", "m"]


def test_missing_group_column(tmp_path):
    p = write(tmp_path / "d.csv", "text,gender\na,f\n")
    with pytest.raises(DataError, match="did you mean 'gender'"):
        load_rows(p, cfg(group_cols=["gendr"]), "lm")


def test_data_error_is_user_error():
    assert issubclass(DataError, UserError)


# ---- splitting -----------------------------------------------------------------------------------
def make_rows(n: int, users: int | None = None) -> pd.DataFrame:
    df = pd.DataFrame({"example_id": [str(i) for i in range(n)], "text": [f"t{i}" for i in range(n)]})
    if users:
        df["user"] = [f"u{(i * 7) % users:03d}" for i in range(n)]
    return df


def ids(parts):
    return {k: tuple(v["example_id"]) for k, v in parts.items()}


def test_split_deterministic_and_seed_dependent():
    rows, c = make_rows(500), cfg()
    a, b, other = split_rows(rows, c, 3), split_rows(rows, c, 3), split_rows(rows, c, 4)
    assert ids(a) == ids(b)
    assert ids(a) != ids(other)


def test_split_partition_and_fractions():
    rows = make_rows(1000)
    parts = split_rows(rows, cfg(val_frac=0.1, test_frac=0.2), 0)
    sets = {k: set(v["example_id"]) for k, v in parts.items()}
    assert sets["train"] | sets["val"] | sets["test"] == set(rows["example_id"])
    assert sum(len(s) for s in sets.values()) == 1000  # disjoint
    assert len(sets["val"]) == 100 and len(sets["test"]) == 200
    # columns are carried through
    assert list(parts["train"].columns) == list(rows.columns)


def test_split_zero_fractions():
    parts = split_rows(make_rows(20), cfg(val_frac=0.0, test_frac=0.0), 0)
    assert len(parts["train"]) == 20 and len(parts["val"]) == 0 and len(parts["test"]) == 0


def test_split_tiny_keeps_one_of_each():
    parts = split_rows(make_rows(3), cfg(), 0)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [1, 1, 1]


def test_split_by_user_no_user_in_two_splits():
    rows = make_rows(600, users=40)
    parts = split_rows(rows, cfg(val_frac=0.2, test_frac=0.2), 1)
    users = {k: set(v["user"]) for k, v in parts.items()}
    assert not users["train"] & users["val"]
    assert not users["train"] & users["test"]
    assert not users["val"] & users["test"]
    assert len(users["val"]) == 8 and len(users["test"]) == 8 and len(users["train"]) == 24
    assert sum(len(v) for v in parts.values()) == 600
    # control: the same rows split per example do put users in several splits
    plain = split_rows(rows.drop(columns="user"), cfg(val_frac=0.2, test_frac=0.2), 1)
    plain_users = {k: set(rows.set_index("example_id").loc[list(v["example_id"]), "user"])
                   for k, v in plain.items()}
    assert plain_users["train"] & plain_users["val"]


def test_split_column_overrides():
    rows = make_rows(9)
    rows["split"] = ["test", "train", "val"] * 3
    for seed in (0, 1, 2):
        parts = split_rows(rows, cfg(), seed)
        assert list(parts["test"]["example_id"]) == ["0", "3", "6"]
        assert list(parts["train"]["example_id"]) == ["1", "4", "7"]
        assert list(parts["val"]["example_id"]) == ["2", "5", "8"]


def test_split_from_file_column(tmp_path):
    p = write(tmp_path / "d.csv", "text,split\na,val\nb,train\nc,train\n")
    parts = split_rows(load_rows(p, cfg(), "lm"), cfg(), 0)
    assert list(parts["val"]["text"]) == ["a"] and list(parts["train"]["text"]) == ["b", "c"]
    assert len(parts["test"]) == 0


def test_empty_train_split_raises():
    rows = make_rows(2)
    rows["split"] = ["val", "test"]
    with pytest.raises(DataError, match="training split is empty"):
        split_rows(rows, cfg(), 0)


# ---- encode_rows ---------------------------------------------------------------------------------
class FakeTokenizer:
    """Texts are space-separated integer token ids: an encoding the test fully controls."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 1000

    def encode_batch(self, texts):
        return [[int(t) for t in s.split()] for s in texts]


def lm_rows(seqs):
    return pd.DataFrame({"example_id": [str(i) for i in range(len(seqs))],
                         "text": [" ".join(map(str, s)) for s in seqs]})


def test_lm_short_row_block():
    enc = encode_rows(lm_rows([[10, 11, 12]]), FakeTokenizer(), 8, "lm")
    assert enc.input_ids.tolist() == [[1, 10, 11, 12, 0, 0, 0, 0]]
    assert enc.targets.tolist() == [[10, 11, 12, 2, -100, -100, -100, -100]]
    assert enc.lengths.tolist() == [4] and enc.example.tolist() == [0]
    assert enc.labels.tolist() == [-1]
    assert enc.input_ids.dtype == torch.long and enc.targets.dtype == torch.long


def test_lm_exact_fit_and_empty_text():
    # len([bos]+ids) == T exactly: one full block, no padding
    enc = encode_rows(lm_rows([[5, 6, 7], []]), FakeTokenizer(), 4, "lm")
    assert enc.input_ids.tolist() == [[1, 5, 6, 7], [1, 0, 0, 0]]
    assert enc.targets.tolist() == [[5, 6, 7, 2], [2, -100, -100, -100]]
    assert enc.lengths.tolist() == [4, 1] and enc.example.tolist() == [0, 1]


def test_lm_long_rows_oracle():
    rng = np.random.default_rng(0)
    T = 5
    seqs = [list(rng.integers(3, 100, size=n)) for n in (0, 1, 3, 4, 5, 9, 13, 27)]
    seqs = [[int(t) for t in s] for s in seqs]
    enc = encode_rows(lm_rows(seqs), FakeTokenizer(), T, "lm")
    n_blocks = enc.input_ids.shape[0]
    # oracle: a row of n ids has n + 1 targets (ids + eos), hence ceil((n + 1) / T) blocks
    expected_counts = [-(-(len(s) + 1) // T) for s in seqs]
    assert n_blocks == sum(expected_counts)
    assert torch.bincount(enc.example, minlength=len(seqs)).tolist() == expected_counts
    assert enc.example.tolist() == sorted(enc.example.tolist())  # blocks in row order
    for r, seq in enumerate(seqs):
        sel = (enc.example == r).nonzero().flatten()
        x, y, n = enc.input_ids[sel], enc.targets[sel], enc.lengths[sel]
        real_y = y[y != -100].tolist()
        real_x = torch.cat([x[i, :n[i]] for i in range(len(sel))]).tolist()
        assert real_y == seq + [2]  # concatenated targets == ids + [eos]
        assert real_x == [1] + seq  # concatenated inputs == [bos] + ids
        assert int(n.sum()) == len(seq) + 1
        for i in range(len(sel)):
            k = int(n[i])
            assert (y[i, k:] == -100).all() and (y[i, :k] != -100).all()
            assert (x[i, k:] == 0).all()  # padding inputs
            assert x[i, 1:k].tolist() == y[i, :k - 1].tolist()  # shifted by one inside a block
        assert (n[:-1] == T).all()  # only the last block of a row is partial


def test_lm_blocks_never_mix_rows():
    enc = encode_rows(lm_rows([[10] * 3, [20] * 3]), FakeTokenizer(), 8, "lm")
    assert enc.input_ids.shape[0] == 2
    assert 20 not in enc.input_ids[0].tolist() and 10 not in enc.input_ids[1].tolist()


def test_lm_with_real_tokenizer_oracle():
    from safelm.tokenizer import Tokenizer
    texts = ["the cat sat on the mat " * 3, "dogs bark", "🙂 emoji and 日本語 text"]
    tok = Tokenizer.train(texts, 300)
    rows = pd.DataFrame({"example_id": ["a", "b", "c"], "text": texts})
    enc = encode_rows(rows, tok, 6, "lm")
    for r, t in enumerate(texts):
        y = enc.targets[enc.example == r]
        assert y[y != -100].tolist() == tok.encode(t) + [tok.eos_id]


def cls_rows(seqs, labels):
    df = lm_rows(seqs)
    df["label"] = labels
    return df


def test_classify_truncation_lengths_and_labels():
    T = 4
    seqs = [[10], [10, 11, 12], [10, 11, 12, 13, 14, 15], []]
    labels = ["pos", "neg", "neu", "pos"]
    enc = encode_rows(cls_rows(seqs, labels), FakeTokenizer(), T, "classify",
                      ["neg", "neu", "pos"])
    assert enc.input_ids.tolist() == [[1, 10, 0, 0], [1, 10, 11, 12], [1, 10, 11, 12], [1, 0, 0, 0]]
    assert enc.lengths.tolist() == [2, 4, 4, 1]
    assert enc.labels.tolist() == [2, 0, 1, 2]  # index in the sorted label list
    assert enc.example.tolist() == [0, 1, 2, 3]
    assert enc.targets.shape == (4, 0)


def test_classify_label_ids_follow_given_list():
    rows = cls_rows([[5], [6]], ["b", "a"])
    assert encode_rows(rows, FakeTokenizer(), 4, "classify", ["a", "b"]).labels.tolist() == [1, 0]
    assert encode_rows(rows, FakeTokenizer(), 4, "classify", ["b", "a"]).labels.tolist() == [0, 1]


def test_classify_unknown_label_raises():
    rows = cls_rows([[5], [6]], ["a", "zzz"])
    with pytest.raises(DataError, match="zzz"):
        encode_rows(rows, FakeTokenizer(), 4, "classify", ["a", "b"])


def test_read_splits_in_pieces_equals_split_rows_of_a_whole_read(cls_csv, tmp_path):
    """Oracle: split_rows(load_rows(...)). Two streaming passes of 5-row pieces give the same
    splits (by user here), a selection keeps exactly the selected rows, and the whole-file
    checks (duplicate ids) still fire across pieces."""
    from safelm.data import read_splits
    cfg = DataConfig(user_col="user", val_frac=0.2, test_frac=0.2)
    want = split_rows(load_rows(cls_csv, cfg, "classify"), cfg, 3)
    got = read_splits(cls_csv, cfg, "classify", 3, chunk_rows=5)
    for s in ("train", "val", "test"):
        pd.testing.assert_frame_equal(got[s], want[s])
    seen = {}

    def every_other_val(meta):
        seen.update(meta)
        return {"val": np.arange(len(meta["val"])) % 2 == 0}
    got = read_splits(cls_csv, cfg, "classify", 3, select=every_other_val, chunk_rows=5)
    assert "text" not in seen["train"].columns  # select sees metadata only
    pd.testing.assert_frame_equal(got["val"], want["val"].iloc[::2].reset_index(drop=True))
    assert len(got["train"]) == len(got["test"]) == 0
    assert list(got["train"].columns) == list(want["train"].columns)
    rows = pd.read_csv(cls_csv, dtype=str)
    rows.loc[100, "example_id"] = rows.loc[3, "example_id"]
    rows.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(DataError, match="appears twice"):
        read_splits(tmp_path / "dup.csv", cfg, "classify", 3, chunk_rows=5)
