"""Read word vectors: word2vec binary, word2vec text (header ``count dim``) and GloVe text
(no header). Our own reader, because the formats are small and the environment has no gensim;
it checks what gensim-style loaders skip: every row has the header's dimension, the header's
count matches the rows, a binary file is not cut short, every value is finite.

``read_vectors(path) -> (words, matrix)``: ``matrix`` is float32 [len(words), dim], row i is
``words[i]``'s vector, in file order (duplicates kept; callers look up the first). Every problem
with a file is a :class:`~safelm.errors.UserError` naming the file, the line or row, and the fix.
Torch-free, so audits and tools can import it cheaply.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError

__all__ = ["FORMATS", "detect_format", "read_vectors"]

FORMATS = ("word2vec-binary", "word2vec-text", "glove-text")


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as e:
        raise UserError(f"vectors {path}: cannot read it ({e.strerror or e}); give an existing "
                        "word2vec (.bin / .txt) or GloVe (.txt) file") from None
    if not data.strip():
        raise UserError(f"vectors {path}: the file is empty; give a word2vec or GloVe file")
    return data


def _header(first: bytes) -> tuple[int, int] | None:
    parts = first.split()
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return None


def _is_text_row(line: bytes) -> bool:
    try:
        parts = line.decode("utf-8").rstrip("\r\n").rstrip().split(" ")
        np.array(parts[1:], dtype=np.float32)  # any count: the reader names a wrong one
        return len(parts) > 1
    except (UnicodeDecodeError, ValueError):
        return False


def detect_format(path: str | Path) -> str:
    """One of :data:`FORMATS`: a first line of two integers is a word2vec header; then the
    next line either parses as ``word`` + numbers (text) or it does not (binary: float32
    bytes are practically never valid UTF-8 digits and spaces)."""
    return _detect(Path(path), _read(Path(path)))[0]


def _detect(path: Path, data: bytes) -> tuple[str, tuple[int, int] | None, int]:
    """(format, header, offset of the first row)."""
    nl = data.find(b"\n")
    first = data if nl < 0 else data[:nl]
    head = _header(first)
    if head is None:
        return "glove-text", None, 0
    count, dim = head
    if count < 1 or dim < 1:
        raise UserError(f"vectors {path} line 1: header '{first.decode(errors='replace')}' "
                        "declares no words or no dimensions; fix the header (\"count dim\")")
    start = nl + 1
    nxt = data.find(b"\n", start)
    line = data[start:] if nxt < 0 else data[start:nxt]
    return ("word2vec-text" if _is_text_row(line) else "word2vec-binary"), head, start


def read_vectors(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Words and their float32 vectors from a word2vec (binary or text) or GloVe file, the
    format detected from the content (see :func:`detect_format`)."""
    p = Path(path)
    data = _read(p)
    fmt, head, start = _detect(p, data)
    if fmt == "word2vec-binary":
        assert head is not None
        return _read_binary(p, data, start, *head)
    return _read_text(p, data, start, head)


def _read_text(path: Path, data: bytes, start: int, head: tuple[int, int] | None
               ) -> tuple[list[str], np.ndarray]:
    lineno0 = 2 if head else 1
    where = "the header" if head else "line 1"
    dim = head[1] if head else None
    words: list[str] = []
    rows: list[np.ndarray] = []
    text = data[start:].decode("utf-8", errors="replace")
    for i, raw in enumerate(text.split("\n")):
        line = raw.rstrip("\r").rstrip()
        if not line:
            continue
        n = lineno0 + i
        parts = line.split(" ")
        if dim is None:
            dim = len(parts) - 1
            if dim < 1:
                raise UserError(f"vectors {path} line {n}: a word with no numbers; each line "
                                "must be 'word v1 v2 ...'")
        if len(parts) != dim + 1:
            raise UserError(f"vectors {path} line {n}: {len(parts) - 1} values, but {where} "
                            f"says {dim}; every row must have the same dimension (fix or "
                            "remove that line)")
        try:
            vec = np.array(parts[1:], dtype=np.float32)
        except ValueError:
            bad = next(v for v in parts[1:] if not _is_float(v))
            raise UserError(f"vectors {path} line {n}: value {bad!r} of word {parts[0]!r} is "
                            "not a number; fix or remove that line") from None
        if not np.isfinite(vec).all():
            raise UserError(f"vectors {path} line {n}: word {parts[0]!r} has a NaN or infinite "
                            "value; fix or remove that line")
        words.append(parts[0])
        rows.append(vec)
    if head and len(words) != head[0]:
        raise UserError(f"vectors {path}: the header says {head[0]} words but the file has "
                        f"{len(words)} rows; fix the header's first number to {len(words)}")
    if not words:
        raise UserError(f"vectors {path}: no vectors after the header")
    assert dim is not None
    return words, np.stack(rows).astype(np.float32, copy=False).reshape(len(words), dim)


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _read_binary(path: Path, data: bytes, pos: int, count: int, dim: int
                 ) -> tuple[list[str], np.ndarray]:
    """word2vec's C format: per row ``word`` + space + dim little-endian float32 (+ newline)."""
    width = 4 * dim
    out = np.empty((count, dim), dtype=np.float32)
    words: list[str] = []
    for row in range(count):
        while pos < len(data) and data[pos:pos + 1] in (b"\n", b"\r", b" "):
            pos += 1
        sp = data.find(b" ", pos)
        if pos >= len(data) or sp < 0:
            raise UserError(f"vectors {path}: truncated binary file: the header says {count} "
                            f"words of {dim} values but it ends at row {row + 1}: cut short "
                            "(copy or export it again) or, if it is complete, the header's "
                            "count or dimension is wrong (fix the header)")
        word = data[pos:sp].decode("utf-8", errors="replace")
        if sp + 1 + width > len(data):
            raise UserError(f"vectors {path}: truncated binary file at row {row + 1} "
                            f"({word!r}): {dim} float32 values need {width} bytes, "
                            f"{len(data) - sp - 1} left: cut short (copy or export it "
                            "again) or, if it is complete, the header's count or dimension "
                            "is wrong (fix the header)")
        vec = np.frombuffer(data, dtype="<f4", count=dim, offset=sp + 1)
        if not np.isfinite(vec).all():
            raise UserError(f"vectors {path}: row {row + 1} ({word!r}) has a NaN or infinite "
                            "value; the file is damaged or not word2vec binary")
        out[row] = vec
        words.append(word)
        pos = sp + 1 + width
    if data[pos:].strip():
        raise UserError(f"vectors {path}: {len(data) - pos} bytes after the {count} rows the "
                        f"header declares; the header's count ({count}) or dimension ({dim}) "
                        "disagrees with the rows: fix the header")
    return words, out
