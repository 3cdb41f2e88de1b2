"""Scoring text with SafeLM runs: conditional log-likelihood under an LM run, and P(positive)
under a sentiment classifier run.

Why score only the words after the demographic term: ``log P(rest | prefix + term)`` compares
how likely the *same* words are after "she" and after "he". Scoring whole sentences would
mostly measure how frequent the terms themselves are, not what the model associates with them.
Log-probabilities are computed here from the model's logits (float64 log-softmax), with
sliding windows of ``block_size`` tokens for sequences longer than the model's context.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from safelm.api import Run, load_run, predictions_table
from safelm.errors import UserError


def load_lm(run_dir: str | Path) -> Run:
    run = load_run(run_dir)
    if run.cfg.train.task != "lm":
        raise UserError(f"{run_dir} is a classification run; the LM bias audit needs a run "
                        "trained with --task lm")
    return run


def encode_pair(run: Run, prefix: str, continuation: str) -> tuple[list[int], list[int]]:
    """(``<bos>`` + prefix tokens, continuation tokens), tokenized separately so that every
    group's continuation is the same token sequence."""
    tok = run.tokenizer
    return [tok.bos_id] + tok.encode(prefix), tok.encode(continuation)


@torch.no_grad()
def continuation_logprob(run: Run, pairs: list[tuple[list[int], list[int]]],
                         batch_size: int = 64) -> np.ndarray:
    """``sum log P(continuation | context)`` in nats for each (context, continuation) pair."""
    model, T = run.model, run.cfg.model.block_size
    device = next(model.parameters()).device
    pad = run.tokenizer.pad_id
    # Every scored token needs one window of <= T inputs ending just before it.
    windows: list[tuple[int, list[int], int]] = []  # (pair, inputs, target)
    for i, (ctx, cont) in enumerate(pairs):
        full = ctx + cont
        if len(full) - 1 <= T:
            windows.append((i, full[:-1], -1))  # one pass scores all continuation tokens
        else:
            for j in range(len(ctx), len(full)):
                windows.append((i, full[max(0, j - T):j], j))
    out = np.zeros(len(pairs))
    for lo in range(0, len(windows), batch_size):
        chunk = windows[lo:lo + batch_size]
        width = max(len(w[1]) for w in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        for r, (_, inp, _) in enumerate(chunk):
            x[r, :len(inp)] = torch.tensor(inp)
        logp = F.log_softmax(model(x.to(device)).double(), dim=-1).cpu()  # [B, W, V]
        for r, (i, inp, j) in enumerate(chunk):
            ctx, cont = pairs[i]
            full = ctx + cont
            if j < 0:  # positions len(ctx)-1 .. len(full)-2 predict the continuation
                pos = torch.arange(len(ctx) - 1, len(full) - 1)
                out[i] += float(logp[r, pos, torch.tensor(cont)].sum())
            else:
                out[i] += float(logp[r, len(inp) - 1, full[j]])
    return out


def classifier_positive(run_dir: str | Path, texts: list[str]) -> tuple[np.ndarray, str]:
    """P(positive class) of each text under a SafeLM classification run, through the public
    predictions table (the texts go through a temporary CSV)."""
    run = load_run(run_dir)
    if run.cfg.train.task != "classify":
        raise UserError(f"--classifier {run_dir} is a language-model run; give a run trained "
                        "with --task classify")
    labels = list(run.cfg.data.labels)
    target = "positive" if "positive" in labels else labels[-1]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "texts.csv"
        pd.DataFrame({"example_id": [f"g{i}" for i in range(len(texts))],
                      "text": texts}).to_csv(path, index=False)
        overrides: dict[str, Any] = {"format": "csv", "text_col": "text", "text_cols": [],
                                     "label_col": "label",
                                     "user_col": "", "group_cols": [],
                                     "id_col": "example_id", "split_col": "split"}
        table = predictions_table(run, path, data_overrides=overrides)
    if len(labels) == 2:
        p = table["score"].to_numpy(float)
        return (p if target == labels[1] else 1 - p), target
    return table[f"score_{target}"].to_numpy(float), target
