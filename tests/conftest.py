"""Shared fixtures: tiny data files and configs so unit tests train in seconds."""

from __future__ import annotations

import csv
import os
import random
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# Token files (safelm/tokencache.py) go to one temporary cache for the session, which
# subprocesses inherit, rather than the user's ~/.cache
os.environ.setdefault("SAFELM_CACHE_DIR", tempfile.mkdtemp(prefix="safelm-test-tokens-"))
# One torch (OpenMP) thread for the session and every subprocess it starts (they inherit the
# environment; set before any test module imports torch). Tiny models train as fast on one
# thread, and on a shared 2-core machine two threads are many times slower: at load average
# 4-5, test_e2e.py with OMP_NUM_THREADS=2 took 152-165 s against 36-43 s with one thread.
# A value the caller set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=16",
        "model.vocab_size=300", "model.dropout=0.1", "train.batch_size=8", "train.warmup_steps=2",
        "train.log_every=1", "train.progress=off"]

POS = ["great", "wonderful", "lovely", "excellent", "superb", "pleasant"]
NEG = ["awful", "terrible", "bad", "boring", "dreadful", "poor"]


def write_cls_csv(path: Path, n: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["example_id", "text", "label", "gender", "user"])
        for i in range(n):
            pos = rng.random() < 0.5
            words = POS if pos else NEG
            w.writerow([f"e{i}", f"the film was {rng.choice(words)} and the food "
                        f"{rng.choice(words)}", "positive" if pos else "negative",
                        rng.choice(["female", "male"]), f"u{i % 17}"])
    return path


def write_lm_txt(path: Path, n: int = 80, seed: int = 0) -> Path:
    rng = random.Random(seed)
    sents = ["the cat sat on the mat.", "a dog ran to the park.", "she smiled at him.",
             "they ate bread and soup.", "the sun was warm today."]
    path.write_text("\n\n".join(" ".join(rng.choice(sents) for _ in range(4)) for _ in range(n))
                    + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train faster on one thread (and much faster on a busy machine); modules
    that train several use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cls_csv(tmp_path: Path) -> Path:
    return write_cls_csv(tmp_path / "cls.csv")


@pytest.fixture
def lm_txt(tmp_path: Path) -> Path:
    return write_lm_txt(tmp_path / "lm.txt")


class Crash(Exception):
    """A training run killed mid-way (see crash_at)."""


def crash_at(monkeypatch, step: int):
    """Make every Trainer raise Crash right after optimizer step ``step`` (its step record
    logged); returns a function that removes the crash, for the resume that follows."""
    import safelm.trainer as tr
    orig = tr.Trainer._on_step

    def crashing(self, trainer):
        orig(self, trainer)
        if self.global_step == step:
            raise Crash
    monkeypatch.setattr(tr.Trainer, "_on_step", crashing)
    return lambda: monkeypatch.setattr(tr.Trainer, "_on_step", orig)
