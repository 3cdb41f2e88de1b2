"""Pretrained word vectors as the starting point of the token embedding:
``--set model.init_vectors=FILE`` (word2vec binary, word2vec text or GloVe text, read by
:func:`safelm.vectors.read_vectors`; no gensim).

Which tokens are covered. A byte-level BPE token is turned back into its text (the byte-level
alphabet inverted, then UTF-8; a token that is part of a multi-byte character is not text);
one leading space (the ``Ġ`` space marker) is removed, so ``Ġgreat`` and ``great`` both map
to the word ``great``. The rest must be one whole word: non-empty, no whitespace. It is looked
up exactly, then lower-cased (``Paris`` falls back to ``paris``, never the other way); a word
the file lists twice uses its first row. Special tokens (``<pad>``, ``<bos>``, ``<eos>``,
GPT-2's ``<|endoftext|>``) are never covered. Coverage = covered tokens / the tokenizer's
vocabulary size (all tokens, specials and the 256 byte symbols included).

Projection to ``d_model`` (the file's dimension ``D``). The covered tokens' vectors ``X``
[n, D] are centred (the mean over covered tokens subtracted: the shared direction carries no
information about which token is which). Then

* ``D > d_model``: PCA. ``Xc = U S V^T`` (SVD); the rows become ``Xc V_k`` with ``V_k`` the
  first ``k = min(d_model, n, D)`` right singular vectors, sign-fixed so that each one's entry
  of largest magnitude is positive (a deterministic convention; SVD signs are arbitrary);
  columns beyond ``k`` are zero. Method ``"pca"``.
* ``D < d_model``: the centred vectors, zero-padded to ``d_model`` columns. Method ``"pad"``
  (a rotation would not add information, and zeros keep the extra dimensions free for
  training).
* ``D == d_model``: the centred vectors. Method ``"identity"``.

Scale. One factor for all covered rows, so the root mean square of their entries equals the
random init's standard deviation (:data:`safelm.model.INIT_STD`, 0.02): the covered rows
have on average the norm of a random row, so the first steps' logits (the LM head is tied to
the embedding) and gradients have the usual size, while the relative geometry of the vectors
(distances, PCA variance ratios) is kept.

Uncovered rows keep the seed's random init: the initialization draws nothing from the RNG.

Privacy. The vectors are public data applied before training, so a DP run's guarantee is
unchanged, provided the vectors file was not itself derived from the private training data
(vectors trained on it would leak it outside DP-SGD's accounting).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .vectors import detect_format, read_vectors

KEY = "model.init_vectors"
VECTORS_FILE = "vectors.json"


@dataclass
class VectorsFile:
    path: str
    words: list[str]
    matrix: np.ndarray  # float32 [n, D]
    sha256: str
    format: str


@dataclass
class VectorInit:
    """The rows to write into ``tok_emb.weight`` and the record of how they were made."""

    ids: np.ndarray  # int64 [n] token ids, ascending
    rows: np.ndarray  # float32 [n, d_model]
    record: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        r, c = self.record, self.record["coverage"]
        how = {"pca": f"D={r['dim']} -> PCA to {r['d_model']}",
               "pad": f"D={r['dim']} -> zero-padded to {r['d_model']}",
               "identity": f"D={r['dim']} = d_model"}[r["method"]]
        return (f"init vectors: {c['covered']}/{c['vocab']} tokens covered "
                f"({100 * c['fraction']:.0f}%) from {r['path']} ({how})")


def load(path: str | Path) -> VectorsFile:
    """Read and hash the file; every problem is a UserError naming ``model.init_vectors``."""
    from .hashing import file_sha256
    try:
        words, matrix = read_vectors(path)
        fmt = detect_format(path)
    except UserError as e:
        raise UserError(f"{KEY}: {e}") from None
    return VectorsFile(str(path), words, matrix, file_sha256(path), fmt)


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character standing for each byte
    -> that byte (the table HF ``tokenizers``' ByteLevel pre-tokenizer uses)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_words(tokenizer: Any) -> dict[int, str]:
    """Token id -> the whole word it spells (space marker removed), for the tokens that spell
    one; special and added tokens and pieces of words that are not text are left out."""
    dec = byte_decoder()
    hf = tokenizer.hf
    skip = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id,
            *hf.get_added_tokens_decoder()}
    out: dict[int, str] = {}
    for token, i in hf.get_vocab().items():
        if i in skip or any(ch not in dec for ch in token):
            continue
        try:
            text = bytes(dec[ch] for ch in token).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.startswith(" "):
            text = text[1:]
        if text and text.split() == [text]:
            out[i] = text
    return out


def plan(vf: VectorsFile, tokenizer: Any, d_model: int, init_std: float) -> VectorInit:
    """Match the tokenizer's words to the file and project them (see the module doc)."""
    index: dict[str, int] = {}
    for row, word in enumerate(vf.words):
        index.setdefault(word, row)
    ids, rows, exact, lowered = [], [], 0, 0
    for i, word in sorted(token_words(tokenizer).items()):
        row = index.get(word)
        if row is not None:
            exact += 1
        else:
            row = index.get(word.lower())
            if row is None:
                continue
            lowered += 1
        ids.append(i)
        rows.append(row)
    vocab = tokenizer.vocab_size
    if not ids:
        raise UserError(f"{KEY}={vf.path}: no token of the vocabulary ({vocab} tokens) is a "
                        f"word of that file ({len(vf.words)} words, e.g. "
                        f"{', '.join(repr(w) for w in vf.words[:3])}); give vectors for the "
                        "language of the data or drop model.init_vectors")
    X = vf.matrix[np.array(rows)].astype(np.float64)
    Xc = X - X.mean(axis=0)
    n, D = Xc.shape
    if D > d_model:
        method = "pca"
        _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
        V = Vt[:d_model]
        signs = np.sign(V[np.arange(len(V)), np.abs(V).argmax(axis=1)])
        V = V * np.where(signs == 0, 1.0, signs)[:, None]
        P = Xc @ V.T
    else:
        method, P = ("pad" if D < d_model else "identity"), Xc
    if P.shape[1] < d_model:
        P = np.pad(P, ((0, 0), (0, d_model - P.shape[1])))
    rms = float(np.sqrt(np.mean(P ** 2)))
    if not rms > 0:
        spelled = sorted({vf.words[r] for r in rows})
        raise UserError(f"{KEY}={vf.path}: the {n} covered token(s) (words "
                        f"{', '.join(map(repr, spelled[:3]))}) have identical vectors, which "
                        "carry nothing once centred; give a file that covers more of the "
                        "vocabulary or drop model.init_vectors")
    scale = init_std / rms
    record = {"path": vf.path, "sha256": vf.sha256, "format": vf.format,
              "words": len(vf.words), "dim": D, "d_model": d_model, "method": method,
              "centred": True, "scale": scale, "init_std": init_std,
              "coverage": {"covered": n, "vocab": vocab, "fraction": n / vocab},
              "matched": {"exact": exact, "lowercased": lowered}}
    return VectorInit(np.array(ids, dtype=np.int64), (P * scale).astype(np.float32), record)


def apply(model: Any, init: VectorInit) -> None:
    """Write the covered rows into ``model.tok_emb`` (a tied LM head shares them)."""
    import torch
    weight = model.tok_emb.weight
    with torch.no_grad():
        weight[torch.from_numpy(init.ids)] = torch.from_numpy(init.rows).to(weight)
