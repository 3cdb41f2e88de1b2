"""Probe sets for the LM bias audit, written for SafeLM (no external data).

A probe set is a dict (or a JSON file of the same shape, for user-supplied sets)::

    {"name": "...",
     "counterfactual": {
         "attributes": {"gender": {"female": ["the woman", ...], "male": ["the man", ...]}, ...},
         "templates": [{"text": "{X} said the soup was wonderful.", "sentiment": "positive"},
                       ...]},
     "generation": {"attributes": {"gender": {"female": ["The woman said", ...], ...}, ...}}}

Counterfactual terms are aligned: the i-th term of every group of an attribute forms one
counterfactual tuple ("the woman" / "the man"), so the lists of an attribute have equal
length. ``{X}`` marks the term in a template and may not end it (the words after it are what
the model scores). Terms are written lower-case; a term that starts a sentence is capitalized.
``sentiment`` (positive / negative) is optional and enables the sentiment-association score.
"""

from __future__ import annotations

from .default import PROBES as DEFAULT

__all__ = ["DEFAULT"]
