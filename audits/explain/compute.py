"""Explain a classifier run's predictions row by row, and measure whether the explanations
are faithful.

Attributions come from ``safelm.explain`` (integrated gradients through Captum, see there
for the baseline and the convergence delta). Words are the tokenizer's pre-tokens (a word and
its leading space; punctuation apart): a word's attribution is the sum over its BPE pieces.

Faithfulness (deletion test): for each row, delete (drop from the sequence, so the text gets
shorter, as if the words had not been written) the ``k`` tokens with the highest attribution
towards the explained class, and separately ``k`` tokens drawn at random (``draws`` times);
the drop is f(x) - f(x without them), f the explained class's probability. It assumes that a
shorter text is a fair stand-in for "without this evidence" (dropping changes positions of
what follows) and compares each row's top-k drop with the mean of its random drops: the
fraction of rows where top-k moves the prediction more, and a one-sided Wilcoxon signed-rank
test over rows (paired, rows independent, differences symmetric about their median under the
null); a sign test is reported beside it (assumes only independent rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from safelm.errors import UserError
from safelm.explain import (BASELINE, attention_from_last, baseline_id, class_probs,
                            encode_text, integrated_gradients, token_strings, word_spans)


@dataclass
class ExplainSettings:
    n_steps: int = 64  # starting step count; doubled until the delta is small
    max_steps: int = 1024
    tolerance: float = 0.05  # delta within this share of |f(x) - f(baseline)| (+ 1e-3)
    k: int = 3  # tokens deleted per row in the faithfulness test
    draws: int = 20  # random deletions per row
    seed: int = 0
    attention: bool = True
    baseline_word: str | None = None  # None: <pad>


def explain_rows(run: Any, rows: list[dict[str, str]], target: str | None,
                 settings: ExplainSettings, progress: Any = None) -> list[dict[str, Any]]:
    """One record per row: ids, tokens, attributions, words, probabilities, delta and (for
    Transformer runs) the attention from the last real token. ``target``: a label name;
    None explains each row's predicted class."""
    labels = list(run.cfg.data.labels)
    if target is not None and target not in labels:
        raise UserError(f"--target {target!r} is not a label of this run (labels: "
                        f"{', '.join(labels)})")
    base = baseline_id(run, settings.baseline_word)
    out = []
    for r in rows:
        ids, words = encode_text(run, r["text"])
        probs = class_probs(run, [ids])[0]
        pred = int(probs.argmax())
        t = labels.index(target) if target is not None else pred
        ig = integrated_gradients(run, ids, t, settings.n_steps, settings.max_steps,
                                  settings.tolerance, base)
        attr = ig["attributions"]
        spans = word_spans(r["text"], run, words)
        rec = {"id": r["id"], "text": r["text"], "predicted": labels[pred],
               "probabilities": {labels[i]: float(p) for i, p in enumerate(probs)},
               "target": labels[t], "score": float(probs[t]), "ids": ids,
               "tokens": token_strings(run, ids), "attributions": attr,
               "words": [{"word": w, "positions": pos,
                          "attribution": float(sum(attr[p] for p in pos))} for w, pos in spans],
               "f_baseline": ig["f_baseline"], "convergence_delta": ig["convergence_delta"],
               "n_steps": ig["n_steps"], "truncated": len(ids) >= run.cfg.model.block_size}
        if settings.attention:
            rec["attention"] = attention_from_last(run, ids)
        out.append(rec)
        if progress is not None:
            progress()
    return out


def faithfulness(run: Any, records: list[dict[str, Any]], settings: ExplainSettings
                 ) -> dict[str, Any]:
    """The deletion test of the module docstring, over ``records`` from :func:`explain_rows`."""
    from scipy.stats import binomtest, wilcoxon
    labels = list(run.cfg.data.labels)
    rng = np.random.default_rng(settings.seed)
    top, rand, used = [], [], []
    for rec in records:
        ids, attr = rec["ids"], np.asarray(rec["attributions"])
        n = len(ids) - 1  # text tokens (position 0 is <bos>)
        if n < 2:
            continue
        k = min(settings.k, n - 1)
        t = labels.index(rec["target"])
        order = 1 + np.argsort(-attr[1:], kind="stable")
        seqs = [_drop(ids, order[:k])]
        seqs += [_drop(ids, 1 + rng.choice(n, size=k, replace=False))
                 for _ in range(settings.draws)]
        p = class_probs(run, seqs)[:, t]
        f = rec["score"]
        top.append(f - p[0])
        rand.append(float(np.mean(f - p[1:])))
        used.append(rec["id"])
        rec["deletion"] = {"k": k, "top_k_drop": float(f - p[0]),
                           "random_drop_mean": float(np.mean(f - p[1:]))}
    top_a, rand_a = np.asarray(top), np.asarray(rand)
    diff = top_a - rand_a
    res: dict[str, Any] = {
        "k": settings.k, "draws": settings.draws, "rows": len(used),
        "deletion": "tokens dropped from the sequence (<bos> kept)",
        "top_k_drop_mean": float(top_a.mean()) if len(used) else None,
        "random_drop_mean": float(rand_a.mean()) if len(used) else None,
        "fraction_top_beats_random": float((diff > 0).mean()) if len(used) else None,
        "wilcoxon_p": None, "sign_test_p": None,
        "assumptions": ("rows independent; a shorter text stands for 'without this evidence' "
                        "(dropping shifts later positions); Wilcoxon: paired differences "
                        "symmetric under the null; sign test: none beyond independence; "
                        "one-sided (top-k drop > mean random drop)")}
    nz = diff[diff != 0]
    if len(nz) >= 1:
        res["sign_test_p"] = float(binomtest(int((nz > 0).sum()), len(nz), 0.5,
                                             alternative="greater").pvalue)
    if len(nz) >= 2:
        res["wilcoxon_p"] = float(wilcoxon(top_a, rand_a, alternative="greater").pvalue)
    # passed: top-k deletion moves the prediction more on average, and the paired test says
    # so at 5% (the test needs at least two rows that are not ties)
    res["passed"] = bool(res["top_k_drop_mean"] is not None
                         and res["top_k_drop_mean"] > res["random_drop_mean"]
                         and res["wilcoxon_p"] is not None and res["wilcoxon_p"] < ALPHA)
    res["alpha"] = ALPHA
    return res


def _drop(ids: list[int], positions: Any) -> list[int]:
    gone = {int(p) for p in positions}
    return [t for i, t in enumerate(ids) if i not in gone]


ALPHA = 0.05  # level of the paired test behind faithfulness "passed"
_WORD = re.compile(r"\w[\w'-]*", re.UNICODE)


def word_key(word: str) -> str | None:
    """The word as compared across rows: lower-cased, punctuation stripped (None if none)."""
    m = _WORD.search(word.lower())
    return m.group(0) if m else None


def method(settings: ExplainSettings) -> dict[str, Any]:
    return {"name": "integrated gradients (Captum LayerIntegratedGradients on tok_emb)",
            "baseline": (BASELINE if settings.baseline_word is None else
                         BASELINE.replace("<pad>", repr(settings.baseline_word))),
            "n_steps_start": settings.n_steps,
            "max_steps": settings.max_steps, "tolerance": settings.tolerance,
            "attention": "softmax(q k^T / sqrt(d)) of each head, from the last real token"}
