"""SEAT-style contextual word vectors from a SafeLM run (May et al., "On Measuring Social
Biases in Sentence Encoders", NAACL 2019): each word is put in a few semantically bleached
sentence templates, each sentence is encoded as the mean of the model's last hidden states
(the output of the final LayerNorm, read with a forward hook), and the word's vector is the
mean over templates.

Why one vector per word rather than SEAT's one unit per sentence: the permutation test needs
exchangeable units, and the sentences of one word are not independent of each other; keeping
the word as the unit keeps the p-value's assumption the same as for static WEAT.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TEMPLATES = ("This is {w}.", "That is {w}.", "There is {w}.", "Here is {w}.", "{w} is here.",
             "{w} is there.", "It is {w}.")


def sentence_encoder(run: Any) -> Any:
    """A function: text -> mean over its tokens (after <bos>) of the last hidden states."""
    import torch
    model, tok, T = run.model, run.tokenizer, run.cfg.model.block_size
    ln_f = getattr(model, "ln_f", None)
    if ln_f is None:
        from safelm.errors import UserError
        raise UserError(f"--run {run.path}: the model has no final LayerNorm (ln_f) to read "
                        "hidden states from; --contextual needs a SafeLM Transformer or LSTM")
    seen: dict[str, Any] = {}

    def hook(_m: Any, _inp: Any, out: Any) -> None:
        seen["h"] = out

    device = next(model.parameters()).device

    @torch.no_grad()
    def encode(text: str) -> np.ndarray:
        ids = ([tok.bos_id] + tok.encode(text))[:T]
        handle = ln_f.register_forward_hook(hook)
        try:
            model(torch.tensor([ids], device=device))
        finally:
            handle.remove()
        h = seen.pop("h")[0, 1:]  # [T-1, C]: the sentence's tokens, not <bos>
        return h.double().mean(dim=0).cpu().numpy()
    return encode


def contextual_vector(encode: Any, word: str, templates: tuple[str, ...] = TEMPLATES
                      ) -> np.ndarray:
    return np.mean([encode(t.format(w=word)) for t in templates], axis=0)
