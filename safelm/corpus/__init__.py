"""Bundled synthetic corpora, generated deterministically from a seed.

Why: SafeLM's examples and tests must run offline and reproducibly, with known
ground truth.  Nothing here is downloaded or read from data files.

* :func:`sentiment_corpus` - short review sentences with demographic attributes
  (gender, age group, region), pseudo-authors (users), user-level splits and an
  optional planted label bias against one group in the training split.
* :func:`story_corpus` / :func:`write_story_text` - children's-story style
  running English text for the language-model path.
* :func:`write_sentiment_csv` - the sentiment set as a CSV file.
"""

from __future__ import annotations

import os
from typing import Any

from safelm.corpus.sentiment import sentiment_corpus
from safelm.corpus.stories import _atomic_write_text, story_corpus, write_story_text

__all__ = ["sentiment_corpus", "story_corpus", "write_story_text", "write_sentiment_csv"]


def write_sentiment_csv(path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Write ``sentiment_corpus(**kwargs)`` to ``path`` as CSV (no index column).

    Written through a temp file + ``os.replace`` so a reader never sees a
    partial file.
    """
    _atomic_write_text(path, sentiment_corpus(**kwargs).to_csv(index=False))
