"""End-to-end: the installed `safelm` command on the bundled corpus, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

SAFELM = [sys.executable, "-m", "safelm.cli"]
TINY = ["--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
        "--set", "model.block_size=32", "--set", "model.vocab_size=300"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg"}  # OMP_NUM_THREADS=1 from conftest
    out = subprocess.run([*SAFELM, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return out


def test_corpus_train_predict_generate(tmp_path):
    run("corpus", "sentiment", "--n", "3000", "--out", "s.csv", cwd=tmp_path)
    run("corpus", "stories", "--n", "120", "--out", "st.txt", cwd=tmp_path)
    out = run("train", "--data", "s.csv", "--task", "classify", "--out", "cls",
              "--set", "model.n_layer=2", "--set", "model.d_model=64", "--set", "model.block_size=32",
              "--set", "train.epochs=4", "--set", "train.lr=3e-3", "--set", "train.warmup_steps=10",
              "--user-col", "user",
              "--group-cols", "gender,age_group", cwd=tmp_path)
    final = json.loads(out.stdout.splitlines()[0])
    assert final["test_accuracy"] > 0.75  # chance is 0.5; this setting reaches about 0.86
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl",
                 "resume/state.json"):
        assert (tmp_path / "cls" / name).is_file(), name
    run("predict", "cls", "--data", "s.csv", "--split", "test", "--out", "p.csv", cwd=tmp_path)
    table = pd.read_csv(tmp_path / "p.csv")
    src = pd.read_csv(tmp_path / "s.csv")
    assert list(table.columns) == ["example_id", "y_true", "y_pred", "score", "nll", "n_tokens",
                                   "gender", "age_group"]
    assert set(table["example_id"]) == set(src.loc[src["split"] == "test", "example_id"])
    assert "text" not in table.columns  # no raw text by default
    assert ((table["score"] >= 0) & (table["score"] <= 1)).all()
    assert (table["y_pred"] == table["score"].gt(0.5).map({True: "positive",
                                                           False: "negative"})).all()
    run("train", "--data", "st.txt", "--out", "lm", *TINY, "--set", "train.epochs=2",
        cwd=tmp_path)
    gen = run("generate", "lm", "--prompt", "Once upon a time", "--max-new-tokens", "10",
              "--seed", "3", cwd=tmp_path)
    again = run("generate", "lm", "--prompt", "Once upon a time", "--max-new-tokens", "10",
                "--seed", "3", cwd=tmp_path)
    assert gen.stdout.startswith("Once upon a time") and gen.stdout == again.stdout
    run("predict", "lm", "--data", "st.txt", "--out", "plm.csv", cwd=tmp_path)
    lm_table = pd.read_csv(tmp_path / "plm.csv")
    assert len(lm_table) == 120 and (lm_table["nll"] > 0).all() and (lm_table["n_tokens"] > 0).all()


def test_demo_quick(tmp_path):
    out = run("demo", "--quick", "--out", "d", cwd=tmp_path)
    assert "validation perplexity" in out.stdout and "test accuracy" in out.stdout
    assert "recipe: the small classifier from scratch, the best of three" in out.stdout
    assert (tmp_path / "d/predictions_test.csv").is_file()
    assert (tmp_path / "d/lm/model.safetensors").is_file()
