"""Per-token explanations of a classifier's predictions: integrated gradients (Captum's
``LayerIntegratedGradients`` on the token embedding ``tok_emb``) and, for Transformer runs,
the attention each head pays from the last real token (the one the class head reads).

Integrated gradients (Sundararajan et al. 2017) attributes ``f(x) - f(x')`` to the input
tokens, where ``f`` is the probability of the target class and ``x'`` the baseline. The
baseline here is the same sequence with every text token replaced by ``<pad>`` (``<bos>`` and
the positions kept): the pad embedding never reaches a classifier's output in training (it
only ever follows the last real token under causal attention), so it carries no class
evidence, which is what a baseline should mean. ``convergence_delta`` is Captum's
completeness error, ``sum(attributions) - (f(x) - f(x'))``, per row: small means the
path integral was approximated well enough for the attributions to be read as shares.

The model internals (``tok_emb``, the attention blocks) are read here, in the core, so that
audits explain through this module's public functions only. Needs captum (``pip install
'safelm[explain]'``); without it :func:`require_captum` raises a ``UserError``.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

INSTALL_HINT = "pip install 'safelm[explain]'"
BASELINE = ("every text token replaced by <pad> (<bos> and positions kept); f = probability "
            "of the target class")


def baseline_id(run: Any, word: str | None) -> int:
    """The token every text position takes in the baseline: ``<pad>`` (None), or a word the
    tokenizer keeps as one piece (``" " + word``). The pad embedding is never trained; at
    positions a model rarely saw in training, a sequence of pads can look like either class
    (f(baseline) then approaches f(x) and the attributions shrink): a frequent, neutral word
    is then a better reference."""
    if word is None:
        return run.tokenizer.pad_id
    ids = run.tokenizer.encode(" " + word)
    if len(ids) != 1:
        raise UserError(f"--baseline-word {word!r} is {len(ids)} tokens in this run's "
                        "tokenizer; choose a word it keeps whole (a frequent one, e.g. 'the')")
    return ids[0]


def require_captum(what: str = "safelm explain") -> None:
    """Refuse early (exit 2 through the CLI) when captum is not installed."""
    if importlib.util.find_spec("captum") is None:
        raise UserError(f"{what} needs the captum package: {INSTALL_HINT} (or pip install "
                        "captum)")


def require_classifier(run: Any, what: str = "safelm explain") -> None:
    """Explanations are of class predictions: an LM run is refused with the fix."""
    if run.cfg.train.task != "classify":
        raise UserError(f"{run.path} is a language-model run (train.task="
                        f"{run.cfg.train.task}); {what} explains a classifier's predictions: "
                        "pass a run trained with 'safelm train --task classify'")


def encode_text(run: Any, text: str) -> tuple[list[int], list[int]]:
    """``<bos> text`` truncated to the block size, as the classifier reads it, and each
    position's word index in ``text`` (-1 for ``<bos>``): byte-level BPE pieces of one word
    share an index, so attributions can be summed back to words."""
    enc = run.tokenizer.hf.encode(text)
    T = run.cfg.model.block_size
    ids = ([run.tokenizer.bos_id] + list(enc.ids))[:T]
    words = [-1] + [w if w is not None else -1 for w in enc.word_ids]
    return ids, words[:len(ids)]


def token_strings(run: Any, ids: list[int]) -> list[str]:
    """Each id decoded on its own (a piece of a word, with its leading space)."""
    tok = run.tokenizer
    return ["<bos>" if i == tok.bos_id else tok.hf.decode([i], skip_special_tokens=False)
            for i in ids]


def word_spans(text: str, run: Any, words: list[int]) -> list[tuple[str, list[int]]]:
    """(word, positions) for each word of ``text`` that survived truncation, in order."""
    enc = run.tokenizer.hf.encode(text)
    out: dict[int, list[int]] = {}
    for pos, w in enumerate(words):
        if w >= 0:
            out.setdefault(w, []).append(pos)
    spans = []
    for w, positions in out.items():
        toks = [t for t, wid in enumerate(enc.word_ids) if wid == w]
        start, end = enc.offsets[toks[0]][0], enc.offsets[toks[-1]][1]
        spans.append((text[start:end].strip(), positions))
    return spans


@torch.no_grad()
def class_probs(run: Any, seqs: list[list[int]], batch_size: int = 64) -> np.ndarray:
    """Class probabilities [N, C] for token id sequences (each starting with ``<bos>``)."""
    device = next(run.model.parameters()).device
    pad, out = run.tokenizer.pad_id, []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        T = max(len(s) for s in chunk)
        x = torch.tensor([s + [pad] * (T - len(s)) for s in chunk], device=device)
        lengths = torch.tensor([len(s) for s in chunk], device=device)
        out.append(F.softmax(run.model(x, lengths).float(), -1).cpu())
    if not out:
        return np.zeros((0, run.cfg.model.num_classes))
    return torch.cat(out).numpy()


def integrated_gradients(run: Any, ids: list[int], target: int, n_steps: int = 64,
                         max_steps: int = 1024, tolerance: float = 0.05,
                         baseline: int | None = None) -> dict[str, Any]:
    """Integrated gradients of one sequence for one target class.

    Returns ``attributions`` per position (``<bos>``'s is 0 by construction), ``f_x`` and
    ``f_baseline`` (target probability), ``convergence_delta`` (|sum - (f_x - f_baseline)|)
    and the ``n_steps`` used: the step count doubles from ``n_steps`` until the delta is
    within ``tolerance`` x |f_x - f_baseline| (plus 1e-3), or ``max_steps`` is reached (a
    model whose probability jumps along the path needs many steps; the delta says so).
    ``baseline``: the token id of every baseline text position (default ``<pad>``; see
    :func:`baseline_id`)."""
    require_captum()
    from captum.attr import LayerIntegratedGradients
    model = run.model
    device = next(model.parameters()).device

    def prob(x: torch.Tensor) -> torch.Tensor:
        lengths = torch.full((x.shape[0],), x.shape[1], device=x.device, dtype=torch.long)
        return F.softmax(model(x, lengths).float(), -1)[:, target]

    x = torch.tensor([ids], device=device)
    base = torch.full_like(x, run.tokenizer.pad_id if baseline is None else baseline)
    base[0, 0] = ids[0]  # keep <bos>
    with torch.no_grad():
        fx, fb = float(prob(x)[0]), float(prob(base)[0])
    lig = LayerIntegratedGradients(prob, model.tok_emb)
    steps = max(2, n_steps)
    while True:
        with torch.enable_grad():
            attr, delta = lig.attribute(x, baselines=base, n_steps=steps,
                                        internal_batch_size=256,
                                        return_convergence_delta=True)
        d = float(delta.abs().max())
        if d <= tolerance * abs(fx - fb) + 1e-3 or steps >= max_steps:
            break
        steps = min(2 * steps, max_steps)
    return {"attributions": attr.sum(-1)[0].detach().float().cpu().tolist(),  # [T]
            "convergence_delta": d, "f_x": fx, "f_baseline": fb, "n_steps": steps}


@torch.no_grad()
def attention_from_last(run: Any, ids: list[int]) -> list[list[list[float]]] | None:
    """Attention weights [layer][head][position] from the last real token (the one the class
    head reads), recomputed from each block's q and k exactly as the model scores them
    (causal, scale 1/sqrt(head_dim)). None for an LSTM run (it has no attention)."""
    model = run.model
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return None
    device = next(model.parameters()).device
    x_in: list[torch.Tensor] = []
    hooks = [b.attn.register_forward_hook(lambda m, a, o: x_in.append(a[0])) for b in blocks]
    try:
        x = torch.tensor([ids], device=device)
        model(x, torch.tensor([len(ids)], device=device))
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for b, h in zip(blocks, x_in):
        a = b.attn
        B, T, C = h.shape
        q = a.q(h).view(B, T, a.n_head, a.head_dim).transpose(1, 2)  # [1, H, T, hd]
        k = a.k(h).view(B, T, a.n_head, a.head_dim).transpose(1, 2)
        scores = (q[:, :, -1:, :] @ k.transpose(-1, -2)) / math.sqrt(a.head_dim)  # [1,H,1,T]
        maps.append(F.softmax(scores.float(), -1)[0, :, 0, :].cpu().tolist())
    return maps
