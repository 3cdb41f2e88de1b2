"""Token files: corpora bigger than memory, tokenized once and memory-mapped.

nanoGPT's ``train.bin`` pattern, with what SafeLM's privacy and audits need beside it. A data
file is read in pieces (``safelm.data.iter_rows``), never whole:

1. one pass keeps each row's metadata (id, label, user, split column, groups), not its text,
   and decides the split (``safelm.data.split_assignment``, the same split as in memory);
2. a new tokenizer trains on a bounded sample: the first ``data.tokenizer_sample``
   characters of the training split, in file order (the whole split when it is smaller);
3. one more pass encodes each piece with HF ``tokenizers``' parallel batch encoding and
   appends every row's ``<bos> text <eos>`` to ``<split>.bin`` (uint16, or uint32 for a
   vocabulary above 65,536) and its length to ``<split>.lengths.npy``: the index of example
   boundaries. Users and groups stay in the metadata, row by row, so user-level sampling and
   audits work as before. Blocks are cut from the token files on demand
   (``safelm.data.Encoded``), so training holds a few batches, not the corpus.

The files live in a cache dir keyed by a hash of everything that decides them: the data
file's sha256, the task, the data options that shape rows and splits, the split seed and
the tokenizer's own sha256. A second run with the same key reuses them; anything else gets
its own entry, so a stale cache is never read. Each entry is written to a temporary dir and
renamed into place (a crash leaves no half entry), and its ``manifest.json`` records each
file's size and sha256, checked on every reuse: a damaged entry is rebuilt, and says so. A
build killed outright (SIGKILL, the OOM killer) cannot remove its temporary dir; its name
carries the host and process id, and the next build on that host removes the dirs of
processes that no longer run (never another host's: a cache dir may be shared).

The token files are the training data in another form: as sensitive as the data.
``data.cache_dir=none`` keeps them in a temporary dir removed when the process ends.
Canary rows (``privacy.canaries``) are never written here; they are encoded in memory.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import Config
from .data import (SPLITS, Encoded, TokenStore, check_train_nonempty, check_unique_ids,
                   encode_texts, iter_rows, label_ids, split_assignment, token_dtype)
from .errors import UserError
from .hashing import file_sha256

FORMAT = "safelm-tokens/1"
MANIFEST = "manifest.json"
ENV = "SAFELM_CACHE_DIR"
# Options that do not change which text lands in which split, so they stay out of the key
_NOT_IN_KEY = ("labels", "cache_dir", "tokenizer_sample", "group_cols", "empty_group")
_temp_dirs: list[tempfile.TemporaryDirectory] = []


def summary(record: dict[str, Any]) -> str:
    """One line for stderr about a run's token files (its data.json record)."""
    tc = record["token_cache"]
    how = ("reused" if tc["reused"] else f"written in {tc['tokenize_seconds']:.1f} s "
           f"({tc['tokens_per_second']:,} tokens/s)")
    return f"token files: {sum(tc['tokens'].values()):,} tokens {how}, {tc['dir']}"


@dataclass
class Streamed:
    """What :func:`prepare_streamed` gives ``safelm.api.prepare``."""

    splits: dict[str, pd.DataFrame]  # row metadata per split (no text column)
    encoded: dict[str, Encoded]  # blocks over the memory-mapped token files
    record: dict[str, Any]  # for data.json: the cache entry and the tokenizer sample


def cache_root(setting: str) -> Path:
    """The cache dir: ``data.cache_dir``, else ``$SAFELM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/safelm/tokens`` (``~/.cache/safelm/tokens``); ``none``: a temporary
    dir removed at exit."""
    if setting == "none":
        if not _temp_dirs:
            _temp_dirs.append(tempfile.TemporaryDirectory(prefix="safelm-tokens-"))
            atexit.register(_temp_dirs[0].cleanup)
        return Path(_temp_dirs[0].name)
    if setting:
        return Path(setting).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "safelm" / "tokens"


def _writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
            pass
    except OSError as e:
        raise UserError(f"data.cache_dir {root}: cannot write token files there "
                        f"({e.strerror or e}); set --set data.cache_dir=DIR to a writable dir "
                        "(or data.cache_dir=none for a temporary one)") from None


def cache_key(cfg: Config, data_sha256: str, tokenizer_sha256: str) -> str:
    data = {k: v for k, v in cfg.data.__dict__.items() if k not in _NOT_IN_KEY}
    blob = json.dumps({"format": FORMAT, "data_sha256": data_sha256, "task": cfg.train.task,
                       "data": data, "split_seed": cfg.train.seed,
                       "tokenizer_sha256": tokenizer_sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def read_metadata(path: Path, cfg: Config) -> tuple[pd.DataFrame, np.ndarray]:
    """Every row's metadata (no text) and its split, from one pass over the file."""
    parts = [rows.drop(columns="text") for rows in iter_rows(path, cfg.data, cfg.train.task)]
    meta = pd.concat(parts, ignore_index=True)
    check_unique_ids(meta["example_id"], path, cfg.data)
    assign = split_assignment(meta, cfg.data, cfg.train.seed)
    check_train_nonempty(assign)
    return meta, assign


def tokenizer_sample(path: Path, cfg: Config, assign: np.ndarray) -> tuple[list[str], dict]:
    """The first ``data.tokenizer_sample`` characters of the training split, in file order
    (whole rows; the row that crosses the bound is the last one taken)."""
    limit, taken, chars, first = cfg.data.tokenizer_sample, [], 0, 0
    for rows in iter_rows(path, cfg.data, cfg.train.task):
        mine = assign[first:first + len(rows)] == "train"
        first += len(rows)
        for text in rows["text"].to_numpy()[mine]:
            if chars >= limit:
                break
            taken.append(text)
            chars += len(text)
        if chars >= limit:
            break
    n_train = int((assign == "train").sum())
    return taken, {"limit_chars": limit, "chars": chars, "rows": len(taken),
                   "train_rows": n_train, "whole_split": len(taken) == n_train}


def _verify(entry: Path, key: str, rows: dict[str, int]) -> str | None:
    """None when the entry is whole and matches; else what is wrong with it."""
    try:
        man = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST} ({e})"
    if man.get("format") != FORMAT or man.get("key") != key:
        return "its manifest is for another format or key"
    item = np.dtype(man["dtype"]).itemsize
    for split in SPLITS:
        rec = man["splits"][split]
        if rec["rows"] != rows[split]:
            return f"{split} has {rec['rows']} rows, the data {rows[split]}"
        for name, size, sha in ((f"{split}.bin", rec["tokens"] * item, rec["sha256"]),
                                (f"{split}.lengths.npy", None, rec["lengths_sha256"])):
            f = entry / name
            if not f.is_file():
                return f"{name} is missing"
            if size is not None and f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
            if file_sha256(f) != sha:
                return f"{name} does not match its sha256 in the manifest"
    return None


def _temp_prefix(key: str, pid: int | None = None) -> str:
    """``.<key>.<host>.<pid>.``: whose build a temporary dir is (see remove_dead_builds)."""
    host = socket.gethostname().replace(".", "-")
    return f".{key}.{host}.{os.getpid() if pid is None else pid}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_dead_builds(root: Path) -> list[Path]:
    """Remove this host's temporary build dirs whose process no longer runs; returns them."""
    host = socket.gethostname().replace(".", "-")
    gone = []
    for d in root.glob(".*"):
        parts = d.name.split(".")  # "", key, host, pid, random suffix
        if (len(parts) == 5 and parts[2] == host and parts[3].isdigit() and d.is_dir()
                and not _alive(int(parts[3]))):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def _build(path: Path, cfg: Config, tokenizer, assign: np.ndarray, key: str, root: Path,
           data_sha256: str) -> dict[str, Any]:
    """Write a new entry into a temporary dir beside the cache entries, then rename it."""
    lm, dtype = cfg.train.task == "lm", token_dtype(tokenizer.vocab_size)
    remove_dead_builds(root)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(key), dir=root))
    t0 = time.perf_counter()
    try:
        files = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}
        lengths: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        counts = {s: 0 for s in SPLITS}
        first = 0
        try:
            for rows in iter_rows(path, cfg.data, cfg.train.task):
                where = assign[first:first + len(rows)]
                first += len(rows)
                tokens, n = encode_texts(tokenizer, list(rows["text"]), lm, dtype)
                for s in SPLITS:
                    mine = where == s
                    if mine.any():
                        keep = np.repeat(mine, n)
                        files[s].write(tokens[keep].tobytes())
                        lengths[s].append(n[mine])
                        counts[s] += int(n[mine].sum())
        finally:
            for f in files.values():
                f.close()
        seconds = time.perf_counter() - t0
        splits = {}
        for s in SPLITS:
            arr = np.concatenate(lengths[s]) if lengths[s] else np.zeros(0, dtype=np.int64)
            np.save(tmp / f"{s}.lengths.npy", arr.astype(np.int64), allow_pickle=False)
            splits[s] = {"rows": int(len(arr)), "tokens": counts[s],
                         "sha256": file_sha256(tmp / f"{s}.bin"),
                         "lengths_sha256": file_sha256(tmp / f"{s}.lengths.npy")}
        total = sum(v["tokens"] for v in splits.values())
        man = {"format": FORMAT, "key": key, "dtype": dtype.name,
               "vocab_size": tokenizer.vocab_size, "task": cfg.train.task,
               "source": {"sha256": data_sha256, "bytes": path.stat().st_size},
               "splits": splits, "tokenize_seconds": round(seconds, 3),
               "tokens_per_second": round(total / max(seconds, 1e-9))}
        (tmp / MANIFEST).write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
        entry = root / key
        try:
            os.rename(tmp, entry)  # atomic; fails if another process finished first
        except OSError:
            if _verify(entry, key, {s: splits[s]["rows"] for s in SPLITS}) is not None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return man
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open(entry: Path, man: dict[str, Any], splits: dict[str, pd.DataFrame], cfg: Config,
          pad_id: int) -> dict[str, Encoded]:
    lm = cfg.train.task == "lm"
    out = {}
    for s in SPLITS:
        n = man["splits"][s]["tokens"]
        tokens = (np.memmap(entry / f"{s}.bin", dtype=man["dtype"], mode="r", shape=(n,))
                  if n else np.zeros(0, dtype=man["dtype"]))
        lengths = np.load(entry / f"{s}.lengths.npy", allow_pickle=False)
        labels = None if lm else label_ids(splits[s], cfg.data.labels)
        out[s] = Encoded.from_rows(TokenStore([tokens]), lengths, labels,
                                   cfg.model.block_size, pad_id, lm)
    return out


def prepare_streamed(path: str | Path, cfg: Config, tokenizer, *, data_sha256: str | None,
                     train_tokenizer) -> tuple[Streamed, Any]:
    """Metadata, tokenizer (``train_tokenizer(sample)`` when ``tokenizer`` is None) and token
    files for ``path``; returns (Streamed, tokenizer). ``cfg`` gets the resolved labels."""
    path = Path(path)
    meta, assign = read_metadata(path, cfg)
    sample = None
    if tokenizer is None:
        texts, sample = tokenizer_sample(path, cfg, assign)
        tokenizer = train_tokenizer(texts)
        del texts
    splits = {s: meta[assign == s].reset_index(drop=True) for s in SPLITS}
    if cfg.train.task == "classify" and not cfg.data.labels:
        cfg.data.labels = sorted(set(splits["train"]["label"]))
    root = cache_root(cfg.data.cache_dir)
    _writable(root)
    data_sha256 = data_sha256 or file_sha256(path)  # once: a big file takes seconds
    key = cache_key(cfg, data_sha256, tokenizer.sha256())
    entry, rows = root / key, {s: len(v) for s, v in splits.items()}
    reused = entry.exists()
    if reused:
        problem = _verify(entry, key, rows)
        if problem:
            print(f"token cache {entry} is damaged ({problem}); rebuilding it", file=sys.stderr)
            shutil.rmtree(entry, ignore_errors=True)
            reused = False
    if reused:
        man = json.loads((entry / MANIFEST).read_text())
    else:
        man = _build(path, cfg, tokenizer, assign, key, root, data_sha256)
    record = {"token_cache": {"key": key, "dir": str(entry), "reused": reused,
                              "tokens": {s: man["splits"][s]["tokens"] for s in SPLITS},
                              "tokenize_seconds": man["tokenize_seconds"],
                              "tokens_per_second": man["tokens_per_second"]}}
    if sample is not None:
        record["tokenizer_sample"] = sample
    return Streamed(splits, _open(entry, man, splits, cfg, tokenizer.pad_id), record), tokenizer
