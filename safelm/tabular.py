"""Tabular rows as text: ``data.text_cols = [a, b, c]`` turns each row into one string.

The format (docs/design.md, "Tabular rows as text") is ``a: v | b: v | c: v``:

* Columns appear in the order the user gave, never sorted or reordered, so the same
  ``text_cols`` always gives the same text; a run records them in ``config.json`` and
  ``predict`` rebuilds texts from them.
* A missing value (an empty or whitespace-only cell, a JSON ``null``, a float NaN) is the
  explicit token ``<missing>`` (``a: <missing>``), so the model sees that the value is absent
  rather than a shorter text. A real cell that reads ``<missing>`` is indistinguishable from it.
* Numbers are stable across file formats: a decimal number's trailing zeros after the point
  are dropped (``3.0`` and ``3.00`` -> ``3``, ``2.50`` -> ``2.5``), whether it is a CSV cell or a
  JSON number; JSON ints and floats use Python's shortest repr first (``0.1`` -> ``0.1``). Other
  cells are kept as written (``007`` stays ``007``, ``1e3`` stays ``1e3``). JSON true/false are
  ``true``/``false``; JSON lists and objects are compact JSON.
* Whitespace runs (newlines, tabs, repeated spaces) become one space and ends are stripped,
  so a row is always one line; ``|`` inside a value or a column name becomes ``¦`` (U+00A6),
  so `` | `` only ever separates fields.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pandas as pd

MISSING = "<missing>"
SEPARATOR = " | "
_DECIMAL = re.compile(r"[+-]?\d+\.\d*")


def _clean(text: str) -> str:
    """One line, single spaces, no field separator inside."""
    return " ".join(text.split()).replace("|", "\u00a6")


def _number(text: str) -> str:
    """Drop a decimal's trailing zeros (``3.0`` -> ``3``); other text unchanged."""
    if _DECIMAL.fullmatch(text):
        text = text.rstrip("0").rstrip(".")
        return "0" if text in ("", "+", "-", "-0", "+0") else text
    return text


def render_value(value: Any) -> str:
    """One cell as it appears after ``name: `` (see the module docstring for the rules)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _number(repr(value) if isinstance(value, float) else str(value))
    if isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    else:
        text = str(value)
    text = _clean(text)
    return _number(text) if text else MISSING


def row_text(names: list[str], values: list[Any]) -> str:
    """``name: value`` for each column, in the given order, joined by `` | ``."""
    return SEPARATOR.join(f"{_clean(str(n))}: {render_value(v)}" for n, v in zip(names, values))


def table_texts(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    """The text of every row of ``df`` built from ``cols`` (all present; checked by the caller)."""
    columns = [df[c].tolist() for c in cols]
    return pd.Series([row_text(cols, list(vals)) for vals in zip(*columns)], index=df.index,
                     dtype=object)
