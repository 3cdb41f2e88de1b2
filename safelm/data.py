"""Reading rows, splitting them, and turning them into fixed-length token blocks.

Rows are ``{example_id, text, label?, user?, <group columns>}`` whatever the file format
(CSV, JSONL, plain text). Every way a file can be unusable is a :class:`DataError` naming the
file, the line or column, and the fix, because these files come from users.

Decisions (documented in the README):

* Empty group values become the explicit group ``"unknown"`` (``data.empty_group=unknown``),
  so no row silently leaves the audit; ``data.empty_group=error`` refuses them instead.
* Plain text: ``data.text_mode=auto`` reads a file with blank lines as running text (one example
  per blank-line-separated paragraph) and otherwise one example per line.
* Tabular rows: ``data.text_cols`` builds each row's text as ``a: v | b: v`` from those
  columns, in the order given (``safelm/tabular.py`` has the exact rules); group columns are
  read separately, so a sensitive column can be audited whether or not it is in the text.
* The split is a seeded permutation of examples, or of users when ``data.user_col`` is set, so
  that no user is in two splits; a ``split`` column (train/val/test) overrides it.
"""

from __future__ import annotations

import difflib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .config import DataConfig
from .errors import DataError, MissingColumn
from .tabular import table_texts

SPLITS = ("train", "val", "test")
UNKNOWN_GROUP = "unknown"


# ---- reading ------------------------------------------------------------------------------
CHUNK_BYTES = 4 << 20  # text read per piece when streaming a .txt/.jsonl file
CHUNK_ROWS = 50_000  # rows per piece when streaming a .csv file


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                        "re-save the file as UTF-8") from None


def _pieces(path: Path, chunk_bytes: int) -> Iterator[str]:
    """The file's text in pieces that each end at a line break, decoded as UTF-8 (a leading
    byte-order mark dropped), so that no line is split across two pieces."""
    line = 1
    with open(path, "rb") as f:
        first = True
        while True:
            raw = f.read(chunk_bytes)
            if not raw:
                return
            raw += f.readline()  # finish the line the read stopped in
            try:
                text = raw.decode("utf-8-sig" if first else "utf-8")
            except UnicodeDecodeError as e:
                at = line + raw[: e.start].count(b"\n")
                raise DataError(f"{path}: line {at} is not valid UTF-8 (byte "
                                f"0x{raw[e.start]:02x}); re-save the file as UTF-8") from None
            line += raw.count(b"\n")
            first = False
            yield text


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    for name, exts in {"csv": (".csv", ".tsv"), "jsonl": (".jsonl", ".ndjson", ".json"),
                       "txt": (".txt", ".text", ".md")}.items():
        if suffix in exts:
            return name
    raise DataError(f"{path}: unknown format {suffix or '(no extension)'!r}; use .csv, .jsonl or "
                    ".txt, or pass --set data.format=csv|jsonl|txt")


def _iter_jsonl(path: Path, chunk_bytes: int) -> Iterator[pd.DataFrame]:
    """Records in pieces; a column that appears in an earlier piece and not in a later one is
    empty there (as it would be in one table)."""
    i, seen = 0, []
    for piece in _pieces(path, chunk_bytes):
        records = []
        lines = piece.split("\n")
        for line in lines[:-1] if piece.endswith("\n") else lines:
            i += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i} is not valid JSON ({e.msg}); "
                                "each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {i} is JSON but not an object; each line must "
                                'be an object such as {"text": "...", "label": "..."}')
            records.append(obj)
        if records:
            df = pd.DataFrame.from_records(records)
            seen += [c for c in df.columns if c not in seen]
            yield df.reindex(columns=seen)


def _txt_mode(path: Path, chunk_bytes: int) -> str:
    """``running`` if a blank line separates two non-blank ones anywhere, else ``lines``."""
    content = blank = False
    for piece in _pieces(path, chunk_bytes):
        for ln in piece.splitlines():
            if ln.strip():
                if blank:
                    return "running"
                content = True
            elif content:
                blank = True
    return "lines"


def _iter_txt(path: Path, mode: str, text_col: str, chunk_bytes: int) -> Iterator[pd.DataFrame]:
    if mode == "auto":
        mode = _txt_mode(path, chunk_bytes)
    cur: list[str] = []
    for piece in _pieces(path, chunk_bytes):
        parts = []
        for ln in piece.splitlines():
            ln = ln.strip()
            if mode == "lines":
                if ln:
                    parts.append(ln)
            elif ln:
                cur.append(ln)
            elif cur:  # a paragraph ends at any blank (or whitespace-only) line
                parts.append(" ".join(" ".join(cur).split()))
                cur = []
        parts = [p for p in parts if p]
        if parts:
            yield pd.DataFrame({text_col: parts})
    if cur:
        last = " ".join(" ".join(cur).split())
        if last:
            yield pd.DataFrame({text_col: [last]})


def _iter_csv(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        reader = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False,
                             chunksize=chunk_rows, encoding="utf-8-sig")
        yield from reader
    except pd.errors.EmptyDataError:
        return
    except UnicodeDecodeError:
        _decode(path)  # raises the DataError naming the line
        raise
    except pd.errors.ParserError as e:
        raise DataError(f"{path}: not a valid CSV file ({str(e).strip()})") from None


def iter_tables(path: str | Path, cfg: DataConfig, *, chunk_bytes: int = CHUNK_BYTES,
                chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The file's rows as DataFrames of strings, piece by piece, so a file larger than memory
    can be read (no column checks yet; a file with no rows is a DataError)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file; check the path given to --data")
    if p.is_dir():
        raise DataError(f"{p}: is a directory; --data takes a .csv, .jsonl or .txt file")
    fmt = detect_format(p, cfg.format)
    if fmt == "csv":
        it = _iter_csv(p, chunk_rows)
    elif fmt == "jsonl":
        it = _iter_jsonl(p, chunk_bytes)
    else:
        it = _iter_txt(p, cfg.text_mode, cfg.text_col, chunk_bytes)
    any_rows = False
    for df in it:
        if len(df):
            any_rows = True
            yield df
    if not any_rows:
        raise DataError(f"{p}: contains no examples; give a file with at least one row")


def read_table(path: str | Path, cfg: DataConfig) -> pd.DataFrame:
    """The file's rows as one DataFrame of strings (no column checks yet)."""
    return pd.concat(list(iter_tables(path, cfg)), ignore_index=True)


def _require(df: pd.DataFrame, col: str, path: Path, option: str) -> None:
    if col not in df.columns:
        close = difflib.get_close_matches(col, [str(c) for c in df.columns], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise MissingColumn(f"{path}: no column {col!r} ({hint}columns: "
                            f"{', '.join(map(str, df.columns))}); set it with {option}", col)


def _as_str(series: pd.Series) -> pd.Series:
    return series.map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v))
                      else str(v)).astype(str)


def _row_texts(df: pd.DataFrame, cfg: DataConfig, path: Path, task: str) -> pd.Series:
    """Each row's text: the ``text_col`` cell, or ``data.text_cols`` rendered as one string."""
    if not cfg.text_cols:
        _require(df, cfg.text_col, path, "--text-col")
        return _as_str(df[cfg.text_col])
    columns = [str(c) for c in df.columns]
    for col in cfg.text_cols:
        if col not in columns:
            raise MissingColumn(f"--text-cols names column {col!r}, which {path} lacks; its "
                                f"columns are: {', '.join(columns)}", col)
    if task == "classify" and cfg.label_col in cfg.text_cols:
        raise DataError(f"--text-cols includes the label column {cfg.label_col!r}; the model "
                        "would read the answer from its input: leave it out of --text-cols")
    return table_texts(df, list(cfg.text_cols)).astype(str)


def iter_rows(path: str | Path, cfg: DataConfig, task: str, **chunking) -> Iterator[pd.DataFrame]:
    """Normalized rows piece by piece: example_id, text, [label], [user], [split], groups.

    Row numbers in errors and generated example ids count from the file's first row, as if it
    were read whole. Duplicate ids across pieces are checked by the caller (:func:`load_rows`,
    or ``safelm.tokencache``), which sees all the ids.
    """
    p = Path(path)
    first = 0
    for df in iter_tables(p, cfg, **chunking):
        yield _normalize(df, cfg, task, p, first)
        first += len(df)


def iter_prediction_rows(path: str | Path, cfg: DataConfig, task: str,
                         **chunking) -> Iterator[tuple[pd.DataFrame, bool]]:
    """Rows to predict on, piece by piece, each with whether the rows carry labels.

    A classifier's file without its label column is predicted unlabelled: decided on the
    first piece (a file read whole would lack the column everywhere). Should a later piece
    bring labels after all (JSONL records that gain the key), that is the error a whole read
    gives: rows without a label. An id that repeats one of an earlier piece is an error as
    soon as its piece is read.
    """
    p = Path(path)
    first, labelled, seen = 0, task == "classify", set()
    for df in iter_tables(p, cfg, **chunking):
        if first == 0 and labelled:
            try:
                rows = _normalize(df, cfg, task, p, first)
            except MissingColumn as e:
                if e.column != cfg.label_col:
                    raise
                labelled = False
        if not labelled:
            if task == "classify" and cfg.label_col in df.columns and \
                    (_as_str(df[cfg.label_col]).str.strip() != "").any():
                raise DataError(f"{p}: rows 1-{first} have no label in column "
                                f"{cfg.label_col!r} but later rows do; fill or drop them")
            rows = _normalize(df, cfg, "lm", p, first)
            rows["label"] = ""
        elif first > 0:
            rows = _normalize(df, cfg, task, p, first)
        check_unique_ids(rows["example_id"], p, cfg, seen)
        yield rows, labelled
        first += len(df)


def check_unique_ids(ids: pd.Series, path: str | Path, cfg: DataConfig,
                     seen: set[str] | None = None) -> None:
    """DataError naming the first id that occurs twice in ``ids`` (or is already in ``seen``,
    the ids of earlier pieces, to which ``ids`` are then added)."""
    dup = ids.duplicated()
    if seen is not None:  # set lookups: O(len(ids)) per piece, not O(ids seen so far)
        dup |= np.fromiter((i in seen for i in ids.tolist()), dtype=bool, count=len(ids))
    if dup.any():
        raise DataError(f"{path}: example id {ids[dup].iloc[0]!r} appears twice in column "
                        f"{cfg.id_col!r}; ids must be unique")
    if seen is not None:
        seen.update(ids.tolist())


def load_rows(path: str | Path, cfg: DataConfig, task: str) -> pd.DataFrame:
    """Read a file into normalized rows: example_id, text, [label], [user], [split], groups."""
    rows = pd.concat(list(iter_rows(path, cfg, task)), ignore_index=True)
    check_unique_ids(rows["example_id"], path, cfg)
    return rows


def _normalize(df: pd.DataFrame, cfg: DataConfig, task: str, p: Path,
               first: int) -> pd.DataFrame:
    """One piece of the file as normalized rows; ``first`` is its first row's index."""
    text = _row_texts(df, cfg, p, task)
    out = pd.DataFrame({"example_id": (_as_str(df[cfg.id_col]).values if cfg.id_col in df.columns
                                       else [str(i) for i in range(first, first + len(df))]),
                        "text": text.values})
    if task == "classify":
        _require(df, cfg.label_col, p, "--label-col")
        labels = _as_str(df[cfg.label_col]).str.strip()
        missing = np.flatnonzero(labels.values == "")
        if len(missing):
            raise DataError(f"{p}: {len(missing)} row(s) have no label in column "
                            f"{cfg.label_col!r} (first: row {first + missing[0] + 1}); fill or "
                            "drop them")
        out["label"] = labels.values
    if cfg.user_col:
        _require(df, cfg.user_col, p, "--user-col")
        users = _as_str(df[cfg.user_col]).str.strip()
        if (users == "").any():
            row = first + int(np.flatnonzero(users.values == "")[0]) + 1
            raise DataError(f"{p}: row {row} has no user in column {cfg.user_col!r}; "
                            "every row needs a user when --user-col is set")
        out["user"] = users.values
    if cfg.split_col and cfg.split_col in df.columns:
        split = _as_str(df[cfg.split_col]).str.strip().str.lower()
        bad = sorted(set(split) - set(SPLITS))
        if bad:
            raise DataError(f"{p}: column {cfg.split_col!r} has values {bad}; allowed: "
                            "train, val, test (or set --set data.split_col= to ignore it)")
        out["split"] = split.values
    for col in cfg.group_cols:
        _require(df, col, p, "--group-cols")
        values = _as_str(df[col]).str.strip()
        if (values == "").any():
            if cfg.empty_group == "error":
                row = first + int(np.flatnonzero(values.values == "")[0]) + 1
                raise DataError(f"{p}: row {row} has an empty value in group column {col!r}; "
                                "fill it or use --set data.empty_group=unknown")
            values = values.replace("", UNKNOWN_GROUP)
        out[col] = values.values
    return out


# ---- splitting ----------------------------------------------------------------------------
def split_assignment(rows: pd.DataFrame, cfg: DataConfig, seed: int) -> np.ndarray:
    """Each row's split (``train``/``val``/``test``): a seeded permutation of examples, or of
    users when there is a user column; a ``split`` column decides instead when present.
    Needs only the rows' ids, users and split column (not their text)."""
    if "split" in rows.columns:
        return rows["split"].to_numpy()
    units = rows["user"].to_numpy() if "user" in rows.columns else np.arange(len(rows))
    uniq = np.unique(units)
    order = np.random.default_rng(seed).permutation(len(uniq))
    n_val, n_test = int(round(cfg.val_frac * len(uniq))), int(round(cfg.test_frac * len(uniq)))
    if len(uniq) >= 3:  # keep at least one unit for each non-empty fraction
        n_val = max(n_val, 1 if cfg.val_frac > 0 else 0)
        n_test = max(n_test, 1 if cfg.test_frac > 0 else 0)
    which = np.empty(len(uniq), dtype=object)
    which[order] = "train"
    which[order[:n_val]] = "val"
    which[order[n_val:n_val + n_test]] = "test"
    return which[np.searchsorted(uniq, units)]


def split_rows(rows: pd.DataFrame, cfg: DataConfig, seed: int) -> dict[str, pd.DataFrame]:
    """Deterministic train/val/test split; by user when there is a user column."""
    assign = split_assignment(rows, cfg, seed)
    check_train_nonempty(assign)
    return {s: rows[assign == s].reset_index(drop=True) for s in SPLITS}


def metadata_split(pieces: Iterable[pd.DataFrame], cfg: DataConfig,
                   seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows' metadata (normalized pieces without their text) and each row's split, as
    :func:`split_rows` would assign it; an empty training split is an error."""
    meta = pd.concat([r.drop(columns="text") for r in pieces], ignore_index=True)
    assign = split_assignment(meta, cfg, seed)
    check_train_nonempty(assign)
    return meta, assign


def read_splits(path: str | Path, cfg: DataConfig, task: str, seed: int,
                select: Callable[[dict[str, pd.DataFrame]], dict[str, np.ndarray]] | None = None,
                **chunking: int) -> dict[str, pd.DataFrame]:
    """:func:`split_rows` of the file, read in two streaming passes so that only the selected
    rows' text is ever in memory: the first pass reads every row's metadata (no text), which
    decides the split (:func:`split_assignment`); ``select(meta)`` gets that metadata per
    split and returns, per split, a boolean mask over those rows (a split it leaves out keeps
    no rows; None keeps all); the second pass keeps the selected rows, in file order, as
    :func:`split_rows` gives them. Duplicate ids and an empty training split are errors, as
    in :func:`load_rows` and :func:`split_rows`."""
    meta, assign = metadata_split(iter_rows(path, cfg, task, **chunking), cfg, seed)
    check_unique_ids(meta["example_id"], path, cfg)
    keep = np.ones(len(meta), dtype=bool)
    if select is not None:
        where = {s: np.flatnonzero(assign == s) for s in SPLITS}
        masks = select({s: meta.iloc[where[s]].reset_index(drop=True) for s in SPLITS})
        keep[:] = False
        for s, mask in masks.items():
            keep[where[s][np.asarray(mask, dtype=bool)]] = True
    parts: dict[str, list[pd.DataFrame]] = {s: [] for s in SPLITS}
    at, empty = 0, None
    for rows in iter_rows(path, cfg, task, **chunking):
        empty = rows.head(0) if empty is None else empty
        sl = slice(at, at + len(rows))
        at += len(rows)
        for s in SPLITS:
            mask = keep[sl] & (assign[sl] == s)
            if mask.any():
                parts[s].append(rows[mask])
    return {s: pd.concat(parts[s], ignore_index=True) if parts[s] else empty for s in SPLITS}


def check_train_nonempty(assign: np.ndarray) -> None:
    if not (assign == "train").any():
        raise DataError("the training split is empty; give more rows or lower "
                        "data.val_frac / data.test_frac")


# ---- token blocks -------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type for ids below ``vocab_size`` (nanoGPT stores uint16)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_texts(tokenizer, texts: list[str], lm: bool,
                 dtype: np.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each text as one token sequence, all concatenated: ``<bos> text <eos>`` (LM) or
    ``<bos> text`` (classify, untruncated; blocks cut it). Returns (tokens, per-row lengths).
    HF ``tokenizers`` encodes the batch in parallel."""
    dtype = dtype or token_dtype(tokenizer.vocab_size)
    ids = tokenizer.encode_batch(texts)
    body = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
    lengths = body + (2 if lm else 1)
    ends = np.cumsum(lengths)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    starts = ends - lengths
    keep = np.ones(len(out), dtype=bool)
    out[starts], keep[starts] = tokenizer.bos_id, False
    if lm:
        out[ends - 1], keep[ends - 1] = tokenizer.eos_id, False
    out[keep] = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype,
                            count=int(body.sum()))
    return out, lengths


class TokenStore:
    """Token ids addressed as one flat sequence made of parts: memory-mapped token files
    (``safelm.tokencache``) and in-memory arrays (rows encoded on the fly, canaries)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = list(parts)
        self.bounds = np.cumsum([0] + [len(x) for x in self.parts])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def gather(self, pos: np.ndarray) -> np.ndarray:
        """``tokens[pos]`` as int64 for an array of positions (reads only those pages)."""
        if len(self.parts) == 1:
            return self.parts[0][pos].astype(np.int64)
        out = np.empty(pos.shape, dtype=np.int64)
        for part, lo, hi in zip(self.parts, self.bounds[:-1], self.bounds[1:]):
            m = (pos >= lo) & (pos < hi)
            if m.any():
                out[m] = part[pos[m] - lo]
        return out


def block_index(row_lengths: np.ndarray, block_size: int,
                lm: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, length, row) of every block over rows stored back to back.

    LM: a row of L tokens (``<bos> text <eos>``) gives ceil((L-1)/T) windows of up to T inputs
    whose targets are the next tokens, so blocks never mix rows and one example's influence
    stays in its own blocks (which per-example and per-user privacy need). Classify: one block
    per row, its first T tokens; the model reads the label off the last real token.
    """
    T, L = block_size, np.asarray(row_lengths, dtype=np.int64)
    offsets = np.cumsum(L) - L
    if not lm:
        return offsets, np.minimum(L, T), np.arange(len(L))
    per_row = (L - 1 + T - 1) // T
    row = np.repeat(np.arange(len(L)), per_row)
    k = np.arange(len(row)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    return offsets[row] + k * T, np.minimum(T, L[row] - 1 - k * T), row


class Batch(NamedTuple):
    """One batch (or, from a dataset, one block) as the Trainer and the DP engine see it.

    Fields are tensors with the batch dimension first; ``weights`` is None unless the training
    set carries per-block loss weights (``train.reweight``).
    """

    input_ids: torch.Tensor  # [B, T] int64, padded with pad_id
    targets: torch.Tensor  # [B, T] LM next tokens (-100 at padding); classify: [B, 0]
    lengths: torch.Tensor  # [B] real tokens in input_ids
    labels: torch.Tensor  # [B] class ids (classify), -1 (lm), -100 (a DP padding row)
    weights: torch.Tensor | None = None  # [B] loss weight per block, or None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(None if t is None else t.to(device, non_blocking=True) for t in self))

    @staticmethod
    def collate(items: list[Batch]) -> Batch:
        """Stack blocks into a batch (torch's default collate cannot stack a None field)."""
        return Batch(*(None if col[0] is None else torch.stack(col) for col in zip(*items)))


@dataclass
class Encoded:
    """What a model consumes: blocks over a :class:`TokenStore`, built on demand.

    Block ``i`` reads ``lengths[i]`` tokens from ``start[i]``; for an LM its targets are the
    same span shifted by one. ``example`` maps each block back to its row, so per-example
    scores (the predictions table, membership audits) can sum over a long example's blocks.
    Nothing holds all blocks at once: a memory-mapped store keeps a corpus on disk.
    """

    tokens: TokenStore
    start: np.ndarray  # [N] int64 position of each block's first input token
    lengths: torch.Tensor  # [N] real tokens per block
    labels: torch.Tensor  # [N] class ids (classify) or -1 (lm)
    example: torch.Tensor  # [N] row index in the source table
    block_size: int
    pad_id: int
    lm: bool
    weights: torch.Tensor | None = None  # [N] loss weight per block (train.reweight) or None

    @classmethod
    def from_rows(cls, tokens: TokenStore, row_lengths: np.ndarray, labels: np.ndarray | None,
                  block_size: int, pad_id: int, lm: bool) -> Encoded:
        """Blocks over rows stored back to back in ``tokens`` (``labels``: per row, classify)."""
        start, n, row = block_index(row_lengths, block_size, lm)
        lab = (torch.full((len(row),), -1, dtype=torch.long) if lm
               else torch.as_tensor(np.asarray(labels, dtype=np.int64)[row]))
        return cls(tokens, start, torch.as_tensor(n), lab, torch.as_tensor(row), block_size,
                   pad_id, lm)

    @classmethod
    def from_tensors(cls, input_ids: torch.Tensor, targets: torch.Tensor,
                     lengths: torch.Tensor, labels: torch.Tensor, example: torch.Tensor,
                     pad_id: int = 0) -> Encoded:
        """From ready blocks (tests, callers that build blocks themselves). LM blocks
        (``targets`` as wide as the inputs) must hold next-token targets."""
        N, T = input_ids.shape
        lm = targets.shape[1] == T and T > 0
        n = lengths.tolist()
        seqs = [torch.cat([input_ids[i, :n[i]], targets[i, n[i] - 1:n[i]]]) if lm
                else input_ids[i, :n[i]] for i in range(N)]
        if lm and any(not torch.equal(input_ids[i, 1:n[i]], targets[i, :n[i] - 1])
                      for i in range(N)):
            raise ValueError("LM targets must be the inputs shifted by one token")
        flat = torch.cat(seqs).numpy() if N else np.zeros(0, dtype=np.int64)
        width = np.asarray([len(x) for x in seqs], dtype=np.int64)
        return cls(TokenStore([flat]), np.cumsum(width) - width, lengths.clone(), labels.clone(),
                   example.clone(), T, pad_id, lm)

    def __len__(self) -> int:
        return len(self.start)

    def blocks(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, T], targets [B, T] or [B, 0]) of the blocks at ``idx``."""
        start = np.atleast_1d(self.start[idx])
        n = np.atleast_1d(self.lengths.numpy()[idx])
        ar = np.arange(self.block_size)
        pos = start[:, None] + ar
        valid = ar < n[:, None]
        x = np.where(valid, self.tokens.gather(np.where(valid, pos, 0)), self.pad_id)
        if not self.lm:
            return torch.from_numpy(x), torch.zeros((len(start), 0), dtype=torch.long)
        y = np.where(valid, self.tokens.gather(np.where(valid, pos + 1, 0)), -100)
        return torch.from_numpy(x), torch.from_numpy(y)

    def take(self, idx) -> Batch:
        """The blocks at ``idx`` (a slice or an index array) as one batch."""
        x, y = self.blocks(idx)
        return Batch(x, y, self.lengths[idx], self.labels[idx],
                     None if self.weights is None else self.weights[idx])

    @property
    def input_ids(self) -> torch.Tensor:
        """All blocks' inputs [N, T], materialized: for small sets and tests."""
        return self.blocks(slice(None))[0]

    @property
    def targets(self) -> torch.Tensor:
        """All blocks' targets, materialized: for small sets and tests."""
        return self.blocks(slice(None))[1]

    def extend(self, other: Encoded, rows: int) -> Encoded:
        """This set (of ``rows`` rows) followed by ``other``'s blocks, whose ``example``
        indices continue after those rows: how canary rows join a memory-mapped train split
        without being written to the token cache."""
        tokens = TokenStore(self.tokens.parts + other.tokens.parts)
        return Encoded(tokens, np.concatenate([self.start, other.start + len(self.tokens)]),
                       torch.cat([self.lengths, other.lengths]),
                       torch.cat([self.labels, other.labels]),
                       torch.cat([self.example, other.example + rows]), self.block_size,
                       self.pad_id, self.lm)


class BlockDataset(Dataset):
    """:class:`Batch` items over an :class:`Encoded`, one per block; ``weights`` is the
    block's loss weight when the encoding carries weights (``train.reweight``)."""

    def __init__(self, enc: Encoded):
        self.enc = enc

    def __len__(self) -> int:
        return len(self.enc)

    def __getitem__(self, i: int) -> Batch:
        e = self.enc
        x, y = e.blocks(i)
        return Batch(x[0], y[0], e.lengths[i], e.labels[i],
                     None if e.weights is None else e.weights[i])


def label_ids(rows: pd.DataFrame, labels: list[str] | None) -> np.ndarray:
    """Class ids of the rows' labels; a label the training data lacks is a DataError."""
    index = {name: i for i, name in enumerate(labels or [])}
    unknown = sorted(set(rows["label"]) - set(index))
    if unknown:
        raise DataError(f"labels {unknown[:5]} do not occur in the training data "
                        f"(known: {', '.join(index)}); they cannot be predicted")
    return np.fromiter((index[v] for v in rows["label"]), dtype=np.int64, count=len(rows))


def encode_rows(rows: pd.DataFrame, tokenizer, block_size: int, task: str,
                labels: list[str] | None = None) -> Encoded:
    """Tokenize rows (in memory) into fixed-length blocks; see :func:`block_index` for how
    rows become blocks. ``safelm.tokencache`` builds the same blocks over token files."""
    lm = task == "lm"
    lab = None if lm else label_ids(rows, labels)
    tokens, lengths = encode_texts(tokenizer, list(rows["text"]), lm)
    return Encoded.from_rows(TokenStore([tokens]), lengths, lab, block_size,
                             tokenizer.pad_id, lm)
