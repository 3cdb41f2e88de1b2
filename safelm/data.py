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
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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
def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                        "re-save the file as UTF-8") from None


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


def _read_jsonl(path: Path, text: str) -> pd.DataFrame:
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {i} is not valid JSON ({e.msg}); "
                            "each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {i} is JSON but not an object; each line must be "
                            'an object such as {"text": "...", "label": "..."}')
        records.append(obj)
    return pd.DataFrame.from_records(records)


def _read_txt(text: str, mode: str, text_col: str) -> pd.DataFrame:
    lines = text.strip().splitlines()
    if mode == "auto":
        mode = "running" if any(not ln.strip() for ln in lines) else "lines"
    if mode == "lines":
        parts = [ln.strip() for ln in lines]
    else:  # a paragraph ends at any blank (or whitespace-only) line
        parts, cur = [], []
        for ln in lines + [""]:
            if ln.strip():
                cur.append(ln.strip())
            elif cur:
                parts.append(" ".join(" ".join(cur).split()))
                cur = []
    return pd.DataFrame({text_col: [p for p in parts if p]})


def read_table(path: str | Path, cfg: DataConfig) -> pd.DataFrame:
    """The file's rows as a DataFrame of strings (no column checks yet)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file; check the path given to --data")
    if p.is_dir():
        raise DataError(f"{p}: is a directory; --data takes a .csv, .jsonl or .txt file")
    fmt = detect_format(p, cfg.format)
    text = _decode(p)
    if fmt == "csv":
        sep = "\t" if p.suffix.lower() == ".tsv" else ","
        try:
            df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            df = pd.DataFrame()
        except pd.errors.ParserError as e:
            raise DataError(f"{p}: not a valid CSV file ({str(e).strip()})") from None
    elif fmt == "jsonl":
        df = _read_jsonl(p, text)
    else:
        df = _read_txt(text, cfg.text_mode, cfg.text_col)
    if len(df) == 0:
        raise DataError(f"{p}: contains no examples; give a file with at least one row")
    return df


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


def load_rows(path: str | Path, cfg: DataConfig, task: str) -> pd.DataFrame:
    """Read a file into normalized rows: example_id, text, [label], [user], [split], groups."""
    p = Path(path)
    df = read_table(p, cfg)
    text = _row_texts(df, cfg, p, task)
    out = pd.DataFrame({"example_id": (_as_str(df[cfg.id_col]) if cfg.id_col in df.columns
                                       else pd.Series([str(i) for i in range(len(df))])),
                        "text": text.reset_index(drop=True)})
    if out["example_id"].duplicated().any():
        dup = out["example_id"][out["example_id"].duplicated()].iloc[0]
        raise DataError(f"{p}: example id {dup!r} appears twice in column {cfg.id_col!r}; "
                        "ids must be unique")
    if task == "classify":
        _require(df, cfg.label_col, p, "--label-col")
        labels = _as_str(df[cfg.label_col]).str.strip()
        missing = np.flatnonzero(labels.values == "")
        if len(missing):
            raise DataError(f"{p}: {len(missing)} row(s) have no label in column "
                            f"{cfg.label_col!r} (first: row {missing[0] + 1}); fill or drop them")
        out["label"] = labels.values
    if cfg.user_col:
        _require(df, cfg.user_col, p, "--user-col")
        users = _as_str(df[cfg.user_col]).str.strip()
        if (users == "").any():
            row = int(np.flatnonzero(users.values == "")[0]) + 1
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
                row = int(np.flatnonzero(values.values == "")[0]) + 1
                raise DataError(f"{p}: row {row} has an empty value in group column {col!r}; "
                                "fill it or use --set data.empty_group=unknown")
            values = values.replace("", UNKNOWN_GROUP)
        out[col] = values.values
    return out.reset_index(drop=True)


# ---- splitting ----------------------------------------------------------------------------
def split_rows(rows: pd.DataFrame, cfg: DataConfig, seed: int) -> dict[str, pd.DataFrame]:
    """Deterministic train/val/test split; by user when there is a user column."""
    if "split" in rows.columns:
        assign = rows["split"].to_numpy()
    else:
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
        assign = which[np.searchsorted(uniq, units)]
    parts = {s: rows[assign == s].reset_index(drop=True) for s in SPLITS}
    if len(parts["train"]) == 0:
        raise DataError("the training split is empty; give more rows or lower "
                        "data.val_frac / data.test_frac")
    return parts


# ---- token blocks -------------------------------------------------------------------------
@dataclass
class Encoded:
    """What a model consumes; row ``i`` of each tensor is one block.

    ``example`` maps each block back to its row, so per-example scores (the predictions
    table, membership audits) can sum over a long example's blocks.
    """

    input_ids: torch.Tensor  # [N, T] int64, padded with pad_id
    targets: torch.Tensor  # [N, T] LM: next token or -100 at padding; classify: unused [N, 0]
    lengths: torch.Tensor  # [N] real tokens in input_ids
    labels: torch.Tensor  # [N] class ids (classify) or -1 (lm)
    example: torch.Tensor  # [N] row index in the source table
    weights: torch.Tensor | None = None  # [N] loss weight per block (train.reweight) or None


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


class BlockDataset(Dataset):
    """:class:`Batch` items over an :class:`Encoded`, one per block; ``weights`` is the
    block's loss weight when the encoding carries weights (``train.reweight``)."""

    def __init__(self, enc: Encoded):
        self.enc = enc

    def __len__(self) -> int:
        return self.enc.input_ids.shape[0]

    def __getitem__(self, i: int) -> Batch:
        e = self.enc
        return Batch(e.input_ids[i], e.targets[i], e.lengths[i], e.labels[i],
                     None if e.weights is None else e.weights[i])


def encode_rows(rows: pd.DataFrame, tokenizer, block_size: int, task: str,
                labels: list[str] | None = None) -> Encoded:
    """Tokenize rows into fixed-length blocks.

    LM: each row becomes ``<bos> text <eos>``, cut into windows of ``block_size`` inputs with
    their next-token targets (a long row gives several blocks; padding at the end is ignored
    by the loss). Blocks never mix rows, so one example's influence stays in its own blocks,
    which per-example and per-user privacy need. Classify: ``<bos> text`` truncated to
    ``block_size``; the model reads the label off the last real token.
    """
    ids = tokenizer.encode_batch(list(rows["text"]))
    pad, bos, eos = tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id
    blocks, targets, lengths, example = [], [], [], []
    T = block_size
    if task == "lm":
        for r, seq in enumerate(ids):
            s = [bos] + seq + [eos]
            for start in range(0, len(s) - 1, T):
                x, y = s[start:start + T], s[start + 1:start + T + 1]
                n = len(y)
                blocks.append(x[:n] + [pad] * (T - n))
                targets.append(y + [-100] * (T - n))
                lengths.append(n)
                example.append(r)
        lab = torch.full((len(blocks),), -1, dtype=torch.long)
        tgt = torch.tensor(targets, dtype=torch.long)
    else:
        index = {name: i for i, name in enumerate(labels or [])}
        unknown = sorted(set(rows["label"]) - set(index))
        if unknown:
            raise DataError(f"labels {unknown[:5]} do not occur in the training data "
                            f"(known: {', '.join(index)}); they cannot be predicted")
        for r, seq in enumerate(ids):
            s = ([bos] + seq)[:T]
            blocks.append(s + [pad] * (T - len(s)))
            lengths.append(len(s))
            example.append(r)
        lab = torch.tensor([index[v] for v in rows["label"]], dtype=torch.long)
        tgt = torch.zeros((len(blocks), 0), dtype=torch.long)
    return Encoded(input_ids=torch.tensor(blocks, dtype=torch.long).reshape(-1, T),
                   targets=tgt, lengths=torch.tensor(lengths, dtype=torch.long),
                   labels=lab, example=torch.tensor(example, dtype=torch.long))
