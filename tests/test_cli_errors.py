"""The command line turns every user mistake into one ``error: ...`` line and exit status 2."""

from __future__ import annotations

import json

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from safelm.cli import main

TINY = ["--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
        "--set", "model.block_size=16", "--set", "model.vocab_size=300",
        "--set", "train.epochs=1", "--set", "train.device=cpu", "--set", "train.progress=off"]
REPO = Path(__file__).resolve().parents[1]


def write_csv(path: Path, n: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "good great fine bad awful poor movie film plot actor scene music".split()
    lines = ["text,label"]
    for i in range(n):
        lines.append(" ".join(rng.choice(words) for _ in range(8)) + ("," + ("pos" if i % 2 else "neg")))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(capsys, *args: str):
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse errors and --help
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err: str, *needles: str) -> None:
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.endswith("\n")
    assert err.count("\n") == 1, f"expected exactly one line, got: {err!r}"
    for n in needles:
        assert n in err, (n, err)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv")


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, data_csv) -> Path:
    out = tmp_path_factory.mktemp("runs") / "cls"
    assert main(["train", "--data", str(data_csv), "--task", "classify", "--out", str(out),
                 *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, data_csv) -> Path:
    out = tmp_path_factory.mktemp("runs") / "lm"
    out.mkdir()  # an existing *empty* dir is accepted (control for the non-empty case)
    assert main(["train", "--data", str(data_csv), "--out", str(out), *TINY]) == 0
    return out


# ---- train: data problems ------------------------------------------------------------------------
def test_missing_data_file(capsys, tmp_path):
    out = tmp_path / "run"
    rc, _, err = run(capsys, "train", "--data", tmp_path / "nope.csv", "--out", out)
    assert_user_error(rc, err, "nope.csv", "no such file")
    assert not out.exists()  # nothing is created when the command fails


def test_unknown_format(capsys, tmp_path):
    p = tmp_path / "data.xlsx"
    p.write_text("text\nhello\n")
    rc, _, err = run(capsys, "train", "--data", p, "--out", tmp_path / "run")
    assert_user_error(rc, err, "unknown format", "'.xlsx'")
    assert not (tmp_path / "run").exists()


def test_missing_column_suggests(capsys, tmp_path, data_csv):
    rc, _, err = run(capsys, "train", "--data", data_csv, "--out", tmp_path / "run",
                     "--text-col", "txt")
    assert_user_error(rc, err, "no column 'txt'", "did you mean 'text'?")
    rc, _, err = run(capsys, "train", "--data", data_csv, "--out", tmp_path / "run",
                     "--task", "classify", "--label-col", "labels")
    assert_user_error(rc, err, "no column 'labels'", "did you mean 'label'?")
    assert not (tmp_path / "run").exists()


def test_non_utf8(capsys, tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"text\nfine\ncaf\xe9\nok\n")
    rc, _, err = run(capsys, "train", "--data", p, "--out", tmp_path / "run")
    assert_user_error(rc, err, "line 3", "UTF-8")


def test_bad_jsonl_line(capsys, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n', encoding="utf-8")
    rc, _, err = run(capsys, "train", "--data", p, "--out", tmp_path / "run")
    assert_user_error(rc, err, "line 3 is not valid JSON")


# ---- train: config problems ----------------------------------------------------------------------
def test_unknown_set_key(capsys, tmp_path, data_csv):
    rc, _, err = run(capsys, "train", "--data", data_csv, "--out", tmp_path / "run",
                     "--set", "train.epoch=2")
    assert_user_error(rc, err, "train.epoch", "did you mean train.epochs?")


def test_bad_set_value_type(capsys, tmp_path, data_csv):
    rc, _, err = run(capsys, "train", "--data", data_csv, "--out", tmp_path / "run",
                     "--set", "train.epochs=three")
    assert_user_error(rc, err, "train.epochs", "'three'", "not a valid int")


def test_set_range_error(capsys, tmp_path, data_csv):
    rc, _, err = run(capsys, "train", "--data", data_csv, "--out", tmp_path / "run",
                     "--set", "model.d_model=30", "--set", "model.n_head=4")
    assert_user_error(rc, err, "model.d_model=30", "n_head")


def test_missing_config_file(capsys, tmp_path, data_csv):
    rc, _, err = run(capsys, "train", "--data", data_csv, "--out", tmp_path / "run",
                     "--config", tmp_path / "none.toml")
    assert_user_error(rc, err, "none.toml")


# ---- train: out dir ------------------------------------------------------------------------------
def test_out_dir_not_empty_is_left_untouched(capsys, tmp_path, data_csv):
    out = tmp_path / "run"
    (out / "sub").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (out / "notes.txt").write_text("keep me\n")
    (out / "sub" / "x.bin").write_bytes(b"\x00\x01")
    before = tree(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    rc, _, err = run(capsys, "train", "--data", data_csv, "--out", out, *TINY)
    assert_user_error(rc, err, str(out), "already exists", "--resume")
    assert tree(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert sorted(p.name for p in out.rglob("*")) == ["model.safetensors", "notes.txt", "sub",
                                                      "x.bin"]


def test_out_is_a_file(capsys, tmp_path, data_csv):
    out = tmp_path / "run"
    out.write_bytes(b"precious")
    rc, _, err = run(capsys, "train", "--data", data_csv, "--out", out, *TINY)
    assert_user_error(rc, err, "already exists")
    assert out.read_bytes() == b"precious"


# ---- argparse ------------------------------------------------------------------------------------
def test_unknown_option(capsys, tmp_path, data_csv):
    rc, out, err = run(capsys, "train", "--data", data_csv, "--out", tmp_path / "r", "--bogus")
    assert_user_error(rc, err, "--bogus")
    assert out == ""


def test_missing_required_option(capsys):
    rc, _, err = run(capsys, "train", "--out", "x")
    assert_user_error(rc, err, "--data")


def test_unknown_command(capsys):
    rc, _, err = run(capsys, "trian")
    assert_user_error(rc, err, "trian")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["predict", "--help"],
                                  ["generate", "-h"], ["demo", "--help"], ["corpus", "--help"]])
def test_help_exits_zero(capsys, argv):
    rc, out, err = run(capsys, *argv)
    assert rc == 0 and err == ""
    assert out.startswith("usage: safelm")


# ---- predict / generate --------------------------------------------------------------------------
def test_predict_on_non_run_dir(capsys, tmp_path, data_csv):
    d = tmp_path / "not_a_run"
    d.mkdir()
    (d / "file.txt").write_text("x")
    rc, _, err = run(capsys, "predict", d, "--data", data_csv, "--out", tmp_path / "p.csv")
    assert_user_error(rc, err, "not a SafeLM run dir")
    assert not (tmp_path / "p.csv").exists()
    rc, _, err = run(capsys, "predict", tmp_path / "missing", "--data", data_csv,
                     "--out", tmp_path / "p.csv")
    assert_user_error(rc, err, "not a SafeLM run dir")


def test_predict_control_on_real_run(capsys, tmp_path, cls_run, data_csv):
    rc, out, err = run(capsys, "predict", cls_run, "--data", data_csv, "--out", tmp_path / "p.csv")
    assert rc == 0 and "Traceback" not in err
    assert (tmp_path / "p.csv").read_text().count("\n") == 61  # header + 60 rows


def test_generate_on_classification_run(capsys, cls_run):
    rc, _, err = run(capsys, "generate", cls_run, "--prompt", "good")
    assert_user_error(rc, err, "classification run", "--task lm")


@pytest.mark.parametrize("opt, value", [("--temperature", "-0.5"), ("--top-k", "-1"),
                                        ("--max-new-tokens", "-3")])
def test_generate_negative_options(capsys, lm_run, opt, value):
    rc, _, err = run(capsys, "generate", lm_run, opt, value)
    assert_user_error(rc, err, "must be >= 0")


def test_generate_control_on_lm_run(capsys, lm_run):
    rc, out, err = run(capsys, "generate", lm_run, "--prompt", "good", "--temperature", "0",
                       "--max-new-tokens", "5")
    assert rc == 0 and "Traceback" not in err
    assert out.startswith("good") and out.count("\n") == 1


def test_generate_bad_number(capsys, lm_run):
    rc, _, err = run(capsys, "generate", lm_run, "--temperature", "hot")
    assert_user_error(rc, err, "--temperature", "'hot'")


# ---- the same through a real process ---------------------------------------------------------------
def run_proc(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "safelm.cli", *map(str, args)], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("case", ["missing_file", "unknown_key", "unknown_option", "non_utf8"])
def test_subprocess_errors(tmp_path, case):
    data = write_csv(tmp_path / "d.csv", n=10)
    out = tmp_path / "run"
    if case == "missing_file":
        rc, _, err = run_proc(tmp_path, "train", "--data", tmp_path / "nope.csv", "--out", out)
        needles = ("nope.csv",)
    elif case == "unknown_key":
        rc, _, err = run_proc(tmp_path, "train", "--data", data, "--out", out,
                              "--set", "model.nlayer=2")
        needles = ("model.nlayer", "did you mean model.n_layer?")
    elif case == "unknown_option":
        rc, _, err = run_proc(tmp_path, "generate", out, "--no-such-flag", "1")
        needles = ("--no-such-flag",)
    else:
        bad = tmp_path / "bad.txt"
        bad.write_bytes(b"one\ntwo\nthr\xffee\n")
        rc, _, err = run_proc(tmp_path, "train", "--data", bad, "--out", out)
        needles = ("line 3", "UTF-8")
    assert_user_error(rc, err, *needles)
    assert not out.exists()


def test_subprocess_help(tmp_path):
    rc, out, err = run_proc(tmp_path, "train", "--help")
    assert rc == 0 and out.startswith("usage: safelm train") and "Traceback" not in err


def test_resume_accepts_the_original_command_line_and_names_a_conflict(tmp_path, capsys):
    """Re-running the same command with --resume works; an option that differs from the run's
    config.json exits 2 naming the key and both values, and leaves the run dir as it was."""
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "run"
    cmd = ["train", "--data", data, "--out", out, "--task", "classify", *TINY]
    rc, _, err = run(capsys, *cmd)
    assert rc == 0, err
    rc, _, err = run(capsys, *cmd, "--resume")  # the same command again
    assert rc == 0, err
    before = tree(out)
    rc, _, err = run(capsys, *cmd, "--set", "train.lr=0.5", "--resume")
    assert_user_error(rc, err, "train.lr", "0.5", "config.json", "--resume")
    rc, _, err = run(capsys, *cmd[:-len(TINY)], "--task", "lm", "--resume")
    assert_user_error(rc, err, "train.task", "'classify'", "'lm'")
    assert tree(out) == before
    # BPE may reach fewer tokens than model.vocab_size asks for; config.json keeps what it
    # reached, and the original command (asking for more) still resumes
    reached = json.loads((out / "config.json").read_text())["model"]["vocab_size"]
    rc, _, err = run(capsys, *cmd, "--set", f"model.vocab_size={reached + 50}", "--resume")
    assert rc == 0, err
    rc, _, err = run(capsys, *cmd, "--set", f"model.vocab_size={reached - 1}", "--resume")
    assert_user_error(rc, err, "model.vocab_size")
