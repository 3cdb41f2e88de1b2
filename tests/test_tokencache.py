"""Token files (safelm/tokencache.py): streamed reading, memory-mapped blocks equal to the
in-memory encoding, the cache's reuse / keys / repair, the bounded tokenizer sample, and DP
sampling and exact resume over the memory-mapped data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from safelm import Config, train_run
from safelm.api import prepare
from safelm.data import SPLITS, encode_rows, iter_rows, load_rows, split_rows
from safelm.tokenizer import Tokenizer
from conftest import TINY, Crash, crash_at, write_cls_csv, write_lm_txt
from release_helpers import cli, one_error_line

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(tmp_path: Path, *extra: str) -> Config:
    return Config.load(None, TINY + [f"data.cache_dir={tmp_path / 'cache'}", *extra])


# ---- streamed reading ------------------------------------------------------------------------
def _files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    csv_text = ('example_id,text,label\n1,"a quoted, comma",x\n2,"two\nlines",y\n'
                + "".join(f"{i},row {i},{'xy'[i % 2]}\n" for i in range(3, 40)))
    (tmp_path / "a.csv").write_text("\ufeff" + csv_text, encoding="utf-8")
    recs = [{"text": f"line {i}", "label": "x"} for i in range(30)]
    recs[7]["group"] = "g"  # a column that only some records have
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    (tmp_path / "lines.txt").write_text("\n".join(f"  sentence {i}  " for i in range(50)) + "\n")
    (tmp_path / "run.txt").write_text(
        "\n\n".join(f"para {i} first\nline   two\n \n" for i in range(25)) + "\r\nend\r\n")
    return {"csv": (tmp_path / "a.csv", "classify"), "jsonl": (tmp_path / "a.jsonl", "lm"),
            "lines": (tmp_path / "lines.txt", "lm"), "running": (tmp_path / "run.txt", "lm")}


@pytest.mark.parametrize("kind", ["csv", "jsonl", "lines", "running"])
def test_reading_in_small_pieces_gives_the_rows_of_one_whole_read(tmp_path, kind):
    """Piece boundaries (a few bytes or rows each) change nothing: same rows, ids, columns."""
    path, task = _files(tmp_path)[kind]
    c = Config.load(None, []).data
    whole = pd.concat(list(iter_rows(path, c, task, chunk_bytes=1 << 30, chunk_rows=10 ** 9)),
                      ignore_index=True)
    pieces = list(iter_rows(path, c, task, chunk_bytes=16, chunk_rows=3))
    assert len(pieces) > 3
    assert whole.equals(pd.concat(pieces, ignore_index=True).reindex(columns=whole.columns))
    assert whole.equals(load_rows(path, c, task).reindex(columns=whole.columns))


def test_whole_read_oracles_for_text_modes(tmp_path):
    files = _files(tmp_path)
    c = Config.load(None, []).data
    running = load_rows(files["running"][0], c, "lm")["text"].tolist()
    assert running == [f"para {i} first line two" for i in range(25)] + ["end"]
    assert load_rows(files["lines"][0], c, "lm")["text"].tolist() == [
        f"sentence {i}" for i in range(50)]
    assert load_rows(files["csv"][0], c, "classify")["text"].tolist()[:2] == [
        "a quoted, comma", "two\nlines"]


def test_invalid_utf8_in_a_later_piece_names_its_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"".join(b"ok line %d\n" % i for i in range(500)) + b"bad \xff here\n")
    with pytest.raises(Exception, match="line 501 is not valid UTF-8"):
        list(iter_rows(p, Config.load(None, []).data, "lm", chunk_bytes=64))


# ---- token files = in-memory encoding --------------------------------------------------------
@pytest.mark.parametrize("task", ["lm", "classify"])
def test_token_files_give_exactly_the_blocks_of_in_memory_encoding(tmp_path, task):
    """The oracle: the pre-cache path (whole file in pandas, encode_rows) block for block."""
    if task == "lm":
        data = write_lm_txt(tmp_path / "lm.txt", n=60)
        c = cfg(tmp_path, "model.block_size=8")  # long paragraphs: several blocks per row
    else:
        data = write_cls_csv(tmp_path / "cls.csv")
        c = cfg(tmp_path, "train.task=classify", "data.user_col=user")
    prep = prepare(data, c)
    assert isinstance(prep.encoded["train"].tokens.parts[0], np.memmap)
    rows = split_rows(load_rows(data, c.data, task), c.data, c.train.seed)
    assert Tokenizer.train(rows["train"]["text"], 300).sha256() == prep.tokenizer.sha256()
    for s in SPLITS:
        want = encode_rows(rows[s], prep.tokenizer, c.model.block_size, task, c.data.labels)
        got = prep.encoded[s]
        assert len(got) == len(want) > 0
        for field in ("input_ids", "targets", "lengths", "labels", "example"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (s, field)
        assert prep.splits[s]["example_id"].tolist() == rows[s]["example_id"].tolist()
        assert "text" not in prep.splits[s].columns  # metadata only: the text is on disk
    if task == "lm":
        assert (prep.encoded["train"].example.bincount() > 1).any()


def test_canaries_join_the_train_split_in_memory_and_never_the_cache(tmp_path):
    data = write_lm_txt(tmp_path / "lm.txt", n=40)
    prep = prepare(data, cfg(tmp_path, "privacy.canaries=3", "privacy.canary_repeats=2"))
    enc = prep.encoded["train"]
    assert len(prep.splits["train"]) == int(enc.example.max()) + 1
    assert prep.splits["train"]["example_id"].tolist()[-6:] == [
        f"canary{i}-{r}" for i in range(3) for r in range(2)]
    secret = prep.canaries["texts"][0]
    first = len(prep.splits["train"]) - 6  # the first canary row: its blocks, joined
    assert secret in prep.tokenizer.decode(enc.input_ids[enc.example == first].flatten().tolist())
    cached = b"".join(f.read_bytes() for f in (tmp_path / "cache").rglob("*.bin"))
    ids = np.array(prep.tokenizer.encode(secret), dtype=np.uint16).tobytes()
    assert ids not in cached


# ---- the cache -------------------------------------------------------------------------------
def test_second_prepare_reuses_the_files_and_other_inputs_get_other_entries(tmp_path):
    data = write_cls_csv(tmp_path / "cls.csv")
    c = lambda *x: cfg(tmp_path, "train.task=classify", *x)  # noqa: E731
    first, again = prepare(data, c()), prepare(data, c())
    assert not first.record["token_cache"]["reused"] and again.record["token_cache"]["reused"]
    assert again.record["token_cache"]["key"] == first.record["token_cache"]["key"]
    assert "tokenizer_sample" in first.record
    other_seed = prepare(data, c("train.seed=1"))
    write_cls_csv(data, seed=1)  # the same path, edited: a stale entry must not be read
    other_data = prepare(data, c())
    keys = {p.record["token_cache"]["key"] for p in (first, other_seed, other_data)}
    assert len(keys) == 3 and all(not p.record["token_cache"]["reused"]
                                  for p in (other_seed, other_data))
    # a setting that does not change the files (the group columns) shares the entry
    assert prepare(data, c("data.group_cols=gender")).record["token_cache"]["reused"]


def test_a_killed_build_leaves_a_temp_dir_that_the_next_build_removes(tmp_path):
    """A build killed with SIGKILL keeps its temporary dir (no handler runs); the next build
    on this host removes it, and leaves alone a live process's and another host's."""
    import signal
    import time

    from safelm import tokencache
    data = write_lm_txt(tmp_path / "lm.txt", n=4000)
    root = tmp_path / "cache"
    code = ("import sys; sys.path.insert(0, 'tests'); from conftest import TINY; "
            "from safelm import Config; from safelm.api import prepare; "
            f"prepare({str(data)!r}, Config.load(None, TINY + "
            f"['data.cache_dir={root}', 'data.tokenizer_sample=100']))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 60
    while not list(root.glob(".*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    dead = [d for d in root.glob(".*")]
    if not dead:
        pytest.skip("the build finished before it could be killed")
    assert f".{proc.pid}." in dead[0].name
    live = root / f"{tokencache._temp_prefix('k' * 32, os.getppid())}abc"
    other = root / (".k." + "otherhost" + f".{proc.pid}.abc")
    live.mkdir(), other.mkdir()
    prep = prepare(data, cfg(tmp_path))  # a build of its own
    assert not prep.record["token_cache"]["reused"]
    assert not any(d.exists() for d in dead)
    assert live.exists() and other.exists()
    assert not list(root.glob(f"*.{os.getpid()}.*"))  # its own temp dir renamed into place


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "lengths"])
def test_a_damaged_entry_is_rebuilt_and_says_so(tmp_path, capsys, damage):
    data = write_lm_txt(tmp_path / "lm.txt", n=40)
    good = prepare(data, cfg(tmp_path))
    entry = Path(good.record["token_cache"]["dir"])
    want = good.encoded["train"].input_ids.clone()
    del good
    f = entry / "train.bin"
    if damage == "flip":
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 1
        f.write_bytes(bytes(raw))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-2])
    elif damage == "manifest":
        (entry / "manifest.json").write_text("{")
    else:
        (entry / "val.lengths.npy").unlink()
    capsys.readouterr()
    again = prepare(data, cfg(tmp_path))
    assert "damaged" in capsys.readouterr().err
    assert not again.record["token_cache"]["reused"]
    assert torch.equal(again.encoded["train"].input_ids, want)
    assert prepare(data, cfg(tmp_path)).record["token_cache"]["reused"]  # repaired


def test_tokenizer_trains_on_the_bounded_sample_and_the_run_records_it(tmp_path):
    data = write_cls_csv(tmp_path / "cls.csv", n=200)
    c = cfg(tmp_path, "train.task=classify", "data.tokenizer_sample=500", "train.max_steps=1")
    train_run(data, c, tmp_path / "run")
    rec = json.loads((tmp_path / "run/data.json").read_text())["tokenizer_sample"]
    assert rec["limit_chars"] == 500 and 500 <= rec["chars"] < 600
    assert rec["rows"] < rec["train_rows"] and not rec["whole_split"]
    train = split_rows(load_rows(data, c.data, "classify"), c.data, 0)["train"]["text"]
    assert sum(map(len, train[:rec["rows"]])) == rec["chars"]  # the first rows, in file order
    ours = Tokenizer.load(tmp_path / "run/tokenizer.json").sha256()
    assert ours == Tokenizer.train(train[:rec["rows"]], 300).sha256()
    assert ours != Tokenizer.train(train, 300).sha256()  # the control: the bound mattered


def test_unwritable_cache_dir_exits_2_and_writes_nothing(tmp_path, capsys):
    data = write_cls_csv(tmp_path / "cls.csv")
    (tmp_path / "afile").write_text("x")
    rc, _, err = cli(capsys, "train", "--data", data, "--task", "classify", "--out",
                     tmp_path / "run", "--set", f"data.cache_dir={tmp_path / 'afile' / 'sub'}")
    one_error_line(rc, err, "data.cache_dir", "writable", "data.cache_dir=none")
    assert not (tmp_path / "run").exists()


def test_cache_dir_none_leaves_no_token_files(tmp_path):
    data = write_cls_csv(tmp_path / "cls.csv")
    r = subprocess.run([sys.executable, "-m", "safelm.cli", "train", "--data", str(data),
                        "--task", "classify", "--out", str(tmp_path / "run"),
                        "--set", "data.cache_dir=none", "--set", "train.max_steps=1",
                        *[a for kv in TINY for a in ("--set", kv)]],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    entry = Path(json.loads((tmp_path / "run/data.json").read_text())["token_cache"]["dir"])
    assert entry.name and not entry.exists() and not entry.parent.exists()


# ---- DP sampling and exact resume over the token files ---------------------------------------
def test_dp_poisson_batches_are_read_from_the_memory_map(tmp_path):
    """The DP loader's batches are memory-mapped blocks with the Poisson batch-size law:
    mean q*N over many steps (within 4 standard errors), and each row equal to the
    in-memory encoding of the block the sampler chose."""
    from safelm.api import initial_model
    from safelm.privacy import make_privacy
    data = write_lm_txt(tmp_path / "lm.txt", n=200)
    c = cfg(tmp_path, "privacy.enabled=true", "privacy.noise_multiplier=1.0",
            "train.batch_size=16", "model.block_size=32")
    prep = prepare(data, c)
    enc, ds = prep.encoded["train"], prep.dataset("train")
    assert isinstance(enc.tokens.parts[0], np.memmap)
    dp = make_privacy(c, prep)
    assert dp.users is not None  # several blocks per example: Poisson over examples
    model = initial_model(c)
    _, _, loader = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                   torch.utils.data.DataLoader(ds, batch_size=1))
    want = encode_rows(split_rows(load_rows(data, c.data, "lm"), c.data, 0)["train"],
                       prep.tokenizer, 32, "lm")
    sampler, sizes, seen = loader.batch_sampler, [], 0
    for epoch in range(10):
        sampler.set_epoch(epoch)
        for idx in sampler:
            real = [i for i in idx if i >= 0]
            sizes.append(len({int(enc.example[i]) for i in real}))
            if real:
                b = loader.collate_fn([ds[i] for i in real])
                assert torch.equal(b.input_ids, want.input_ids[real])
                assert torch.equal(b.targets, want.targets[real])
                seen += len(real)
    q, n = dp.sample_rate, dp.n_units
    mean, se = np.mean(sizes), np.sqrt(n * q * (1 - q) / len(sizes))
    assert abs(mean - q * n) < 4 * se and seen > 0


@pytest.mark.slow
def test_dp_run_resumes_exactly_over_token_files_even_after_the_cache_is_gone(
        tmp_path, monkeypatch):
    """A DP LM run (user-level, seeded by the recorded opt-out) crashed at step 5 and resumed
    ends bit-identical to the uninterrupted run, also when the token cache was deleted in
    between (the files are rebuilt identically from the data and the run's tokenizer)."""
    data = tmp_path / "lm.csv"
    rows = [{"text": " ".join(["the cat sat on the mat and the dog ran"] * (1 + i % 5)),
             "user": f"u{i % 23}"} for i in range(160)]
    pd.DataFrame(rows).to_csv(data, index=False)
    c = lambda: cfg(tmp_path, "privacy.enabled=true", "privacy.noise_multiplier=1.0",  # noqa
                    "privacy.unit=user", "data.user_col=user", "privacy.reproducible=true",
                    "train.epochs=3", "train.checkpoint_every=3", "model.dropout=0.0")
    train_run(data, c(), tmp_path / "whole")
    uncrash = crash_at(monkeypatch, 5)
    with pytest.raises(Crash):
        train_run(data, c(), tmp_path / "cut")
    uncrash()
    shutil.rmtree(tmp_path / "cache")
    train_run(data, None, tmp_path / "cut", resume=True)
    a, b = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (json.loads((tmp_path / r / "privacy.json").read_text()) for r in ("whole", "cut"))
    assert la["history"] == lb["history"] and la["steps"] > 5
    info = json.loads((tmp_path / "cut/data.json").read_text())
    assert info["token_cache"]["tokens"]["train"] > 0
    assert (tmp_path / "cache").is_dir()  # rebuilt by the resume


def test_eval_blocks_scores_one_fixed_random_subset(tmp_path):
    """train.eval_blocks=N: the Trainer scores the same N seeded blocks at every evaluation
    (an independent evaluate_model over that subset is the oracle); 0 scores them all."""
    from safelm.api import initial_model
    from safelm.trainer import Trainer, evaluate_model
    data = write_lm_txt(tmp_path / "lm.txt", n=60)
    prep = prepare(data, cfg(tmp_path, "train.eval_blocks=7", "model.block_size=8"))
    val = prep.dataset("val")
    assert len(val) > 7
    model = initial_model(prep.cfg)
    tr = Trainer(model, prep.cfg.train, prep.dataset("train"), val)
    keep = np.sort(np.random.default_rng(0).choice(len(val), 7, replace=False)).tolist()
    want = evaluate_model(tr.model, torch.utils.data.Subset(val, keep), "lm", 64)
    assert tr.evaluate() == tr.evaluate() == want
    everything = evaluate_model(tr.model, val, "lm", 64)
    assert everything != want
    tr.cfg.eval_blocks = 0
    assert tr.evaluate() == everything
