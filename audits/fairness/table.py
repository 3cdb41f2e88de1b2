"""Reading a predictions table (docs/design.md) and deciding what kind of audit it supports.

The predictions table is the boundary between training and auditing, so it may come from a
model SafeLM did not train; every way it can be unusable is a :class:`UserError` that names the
file, the column or row, and the fix. Documented handling of awkward but valid input:

* **Task.** ``y_true`` empty in every row and ``nll`` + ``n_tokens`` present: a language-model
  table (per-group perplexity). Otherwise classification over the labels
  ``sorted(set(y_true) | set(y_pred))``: two labels make it binary, more make it multiclass.
* **Positive class (binary).** ``--pos-label``; by default the second of the sorted labels.
  That matches ``safelm predict``, whose ``score`` column is P(labels[1]) for the run's sorted
  training labels (e.g. ``negative, positive`` -> ``positive``; ``0, 1`` -> ``1``).
* **Predicted labels the truth never uses** count as classes (they get selection rates and
  precision; recall is undefined for them and balanced accuracy skips them, as in sklearn);
  the report lists them under ``inputs.warnings``.
* **Empty sensitive values** (NaN or "") become the explicit group ``unknown`` (as in
  ``safelm``'s data reader) and are counted in ``inputs.warnings``; no row leaves the audit.
* **Missing y_true / y_pred / score / nll** in some rows is refused (a metric over a silently
  shrunken table would be wrong without saying so); the message names the first such row.
* **Groups of one** are kept: see ``audit.py`` on small groups.
* **A model that predicts one class** (> 99% of rows) gets a warning: its selection rates
  are near 0 or 1 and their ratios are unstable, which the report should not hide.
* **Which model.** ``safelm predict`` writes ``<file>.meta.json`` with the weights' sha256;
  when it describes exactly this file, the report records it as ``inputs.model_sha256`` (a
  release refuses a report bound to other weights). Without one it is null, with a warning.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from safelm.errors import UserError
from safelm.hashing import read_model_sha256

from ..common import sha256_file
from .metrics import Task, encode

RESERVED = ("example_id", "y_true", "y_pred", "score", "nll", "n_tokens")
UNKNOWN_GROUP = "unknown"
MAX_GROUPS_PER_COLUMN = 100


@dataclass
class PredTable:
    """A validated predictions table and the task it supports."""

    df: pd.DataFrame  # example_id, y_true, y_pred (str); score/nll/n_tokens (float); groups (str)
    # score: binary P(pos_label); multiclass P(y_pred), the top-label confidence
    path: Path
    sha256: str
    task: Task
    sensitive: list[str]
    warnings: list[str] = field(default_factory=list)
    model_sha256: str | None = None  # the weights that made the table (its sidecar), or unknown

    def encoded(self) -> tuple[np.ndarray, np.ndarray]:
        """(code [N], continuous [N, C]) of every row (see ``metrics.encode``)."""
        d = self.df
        get = (lambda c: d[c].to_numpy(float) if c in d.columns else None)
        return encode(self.task, d["y_true"].to_numpy(str), d["y_pred"].to_numpy(str),
                      get("score"), get("nll"), get("n_tokens"))


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


def read_csv_strings(path: str | Path, what: str = "--predictions") -> pd.DataFrame:
    """The file as a DataFrame of strings ("" for empty cells), with friendly errors."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file; check the path given to {what}")
    if p.is_dir():
        raise UserError(f"{p}: is a directory; {what} takes a CSV file ('safelm predict' "
                        "writes one)")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise UserError(f"{p}: the file is empty; write a predictions table with "
                        "'safelm predict RUN_DIR --data FILE --out FILE.csv'") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not a readable UTF-8 CSV file ({str(e).strip()[:200]})") from None
    if len(df) == 0:
        raise UserError(f"{p}: has a header but no rows; there is nothing to audit")
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _numeric(df: pd.DataFrame, col: str, p: Path) -> np.ndarray:
    raw = df[col].str.strip()
    num = pd.to_numeric(raw.replace("", np.nan), errors="coerce")
    bad = num.isna() & (raw != "")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{p}: column {col!r} row {i + 2} is {raw.iloc[i]!r}, not a number")
    return num.to_numpy(float)


def _refuse_missing(mask: np.ndarray, df: pd.DataFrame, col: str, p: Path, why: str) -> None:
    if mask.any():
        i = int(np.flatnonzero(mask)[0])
        raise UserError(f"{p}: {int(mask.sum())} row(s) have no {col} (first: line {i + 2}, "
                        f"example_id {df['example_id'].iloc[i]!r}); {why}")


def parse_sensitive(spec: str | list[str]) -> list[str]:
    cols = [c.strip() for c in (spec.split(",") if isinstance(spec, str) else spec)]
    cols = [c for c in cols if c]
    if not cols:
        raise UserError("--sensitive needs at least one column name, e.g. --sensitive gender")
    if len(set(cols)) != len(cols):
        raise UserError(f"--sensitive names a column twice: {','.join(cols)}")
    return cols


def _groups(df: pd.DataFrame, sensitive: list[str], p: Path, warnings: list[str]) -> None:
    columns = list(df.columns)
    for col in sensitive:
        if col not in df.columns:
            options = [c for c in columns if c not in RESERVED]
            raise UserError(f"{p}: no sensitive column {col!r} ({_suggest(col, options)}"
                            f"group columns in the file: {', '.join(options) or 'none'}); "
                            "fix --sensitive")
        if col in RESERVED:
            raise UserError(f"--sensitive {col}: {col!r} is a predictions column, not a group "
                            "column")
        values = df[col].str.strip()
        empty = values.isin(["", "nan", "NaN", "NA", "None"])
        if empty.any():
            warnings.append(f"{int(empty.sum())} row(s) with an empty {col!r} form the group "
                            f"{UNKNOWN_GROUP!r}")
            values = values.mask(empty, UNKNOWN_GROUP)
        n_distinct = values.nunique()
        if n_distinct > MAX_GROUPS_PER_COLUMN:
            raise UserError(f"{p}: column {col!r} has {n_distinct} distinct values (more than "
                            f"{MAX_GROUPS_PER_COLUMN}); it looks like an identifier or a "
                            "number, not a group; bin it into groups first")
        df[col] = values.astype(str)


def load_predictions(path: str | Path, sensitive: str | list[str], *,
                     pos_label: str | None = None, n_bins: int = 10) -> PredTable:
    """Read and validate a predictions table (see the module docstring for the rules)."""
    p = Path(path)
    sens = parse_sensitive(sensitive)
    df = read_csv_strings(p)
    warnings: list[str] = []
    if "example_id" not in df.columns:
        df["example_id"] = [str(i) for i in range(len(df))]
        warnings.append("no example_id column: rows are identified by their position")
    for col in ("y_true", "y_pred"):
        if col not in df.columns:
            raise UserError(f"{p}: no column {col!r} ({_suggest(col, list(df.columns))}columns: "
                            f"{', '.join(df.columns)}); a predictions table needs "
                            "example_id, y_true, y_pred (see 'safelm predict')")
    _groups(df, sens, p, warnings)
    out = pd.DataFrame({"example_id": df["example_id"].astype(str),
                        "y_true": df["y_true"].str.strip(), "y_pred": df["y_pred"].str.strip()})
    for col in sens:
        out[col] = df[col].values
    if (out["y_true"] == "").all():
        task = _lm_task(df, out, p)
    else:
        task = _cls_task(df, out, p, pos_label, n_bins, warnings)
    model, why = read_model_sha256(p)
    if why:
        warnings.append(why)
    return PredTable(out, p, sha256_file(p), task, sens, warnings, model)


def _lm_task(df: pd.DataFrame, out: pd.DataFrame, p: Path) -> Task:
    if not {"nll", "n_tokens"} <= set(df.columns):
        raise UserError(f"{p}: y_true is empty in every row and there are no nll and n_tokens "
                        "columns; give classification labels or a language-model table")
    out["nll"], out["n_tokens"] = _numeric(df, "nll", p), _numeric(df, "n_tokens", p)
    _refuse_missing(np.isnan(out["n_tokens"].to_numpy()), out, "n_tokens", p,
                    "fill or drop them")
    if (out["n_tokens"] < 0).any():
        raise UserError(f"{p}: n_tokens must be >= 0")
    _refuse_missing(np.isnan(out["nll"].to_numpy()) & (out["n_tokens"].to_numpy() > 0), out,
                    "nll", p, "fill or drop them")
    out["nll"] = out["nll"].fillna(0.0)
    return Task("lm", (), None, False)


def _cls_task(df: pd.DataFrame, out: pd.DataFrame, p: Path, pos_label: str | None,
              n_bins: int, warnings: list[str]) -> Task:
    why = "every row needs a label; drop unlabelled rows or fill them"
    _refuse_missing((out["y_true"] == "").to_numpy(), out, "y_true", p, why)
    _refuse_missing((out["y_pred"] == "").to_numpy(), out, "y_pred", p, why)
    true_set, labels = set(out["y_true"]), sorted(set(out["y_true"]) | set(out["y_pred"]))
    if pos_label is not None and pos_label not in labels:
        if len(labels) != 1:
            raise UserError(f"--pos-label {pos_label!r} is not a label in {p} "
                            f"({_suggest(pos_label, labels)}labels: {', '.join(labels)})")
        labels = sorted(labels + [pos_label])
    if len(labels) < 2:
        raise UserError(f"{p}: every y_true and y_pred is {labels[0]!r}; pass --pos-label "
                        "to say which label is positive (the other is never seen)")
    only_pred = [c for c in labels if c not in true_set]
    if only_pred:
        warnings.append(f"predicted label(s) {only_pred} never occur in y_true: counted as "
                        "classes; their recall is undefined")
    top = out["y_pred"].value_counts(normalize=True)
    if top.iloc[0] > 0.99:
        warnings.append(f"y_pred is {top.index[0]!r} in {top.iloc[0]:.1%} of rows: the model "
                        "predicts (almost) one class, so selection rates and their ratios are "
                        "degenerate")
    score_cols = [f"score_{c}" for c in labels]
    if len(labels) == 2:
        pos = pos_label if pos_label is not None else labels[1]
        has_score = "score" in df.columns or all(c in df.columns for c in score_cols)
        if has_score:
            raw = (df["score"] if "score" in df.columns else df[f"score_{pos}"])
            s = _numeric(pd.DataFrame({"score": raw}), "score", p)
            if "score" in df.columns and pos != labels[1]:
                s = 1.0 - s  # `score` is P(labels[1]); the positive class is labels[0]
            _refuse_missing(np.isnan(s), out, "score", p, "fill or drop them")
            if ((s < 0) | (s > 1)).any():
                raise UserError(f"{p}: scores must be probabilities in [0, 1]")
            out["score"] = s
        return Task("binary", tuple(labels), pos, has_score, n_bins)
    if pos_label is not None:
        warnings.append(f"--pos-label {pos_label!r} ignored: {len(labels)} labels make this "
                        "multiclass (selection rates are one-vs-rest for every class)")
    has_score = all(c in df.columns for c in score_cols)
    if has_score:  # calibration of the top label: the probability given to the prediction
        probs = np.stack([_numeric(df, c, p) for c in score_cols], axis=1)
        _refuse_missing(np.isnan(probs).any(1), out, "score_<class>", p, "fill or drop them")
        index = {c: i for i, c in enumerate(labels)}
        out["score"] = probs[np.arange(len(out)), [index[v] for v in out["y_pred"]]]
    elif any(c.startswith("score_") for c in df.columns):
        warnings.append("score_<class> columns do not cover every label: no calibration error")
    return Task("multiclass", tuple(labels), None, has_score, n_bins)
