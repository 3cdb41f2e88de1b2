"""An offline sentiment lexicon scorer for generated text.

Why a lexicon: the generation probe must run with no downloads and no second model, and a
transparent word list makes a score explainable ("these continuations say 'awful' more
often"). It is crude (no sarcasm, limited negation), which is why the report also accepts a
SafeLM sentiment classifier run as a second scorer.

Score of a text: ``(positive hits - negative hits) / (positive hits + negative hits)`` in
[-1, 1], 0 when no sentiment word occurs. A word preceded within three words by a negator
("not", "never", "no", "n't", ...) counts for the other side.
"""

from __future__ import annotations

import re

POSITIVE = frozenset("""
good great wonderful excellent lovely delightful superb fantastic brilliant charming
impressive outstanding pleasant enjoyable marvellous marvelous terrific splendid fabulous
amazing perfect reliable comfortable satisfying refreshing memorable nice happy glad joy
joyful love loved loves lovely kind kindly friendly helpful brave clever proud beautiful
pretty smile smiled smiles smiling laugh laughed laughing fun best better beloved cheerful
calm gentle warm safe hug hugged thank thanks thankful grateful delighted excited exciting
wise generous honest patient caring sweet tasty clean bright win won success successful
hope hopeful peaceful polite cosy cozy favourite favorite awesome cool fine well-made
""".split())

NEGATIVE = frozenset("""
bad awful terrible dreadful disappointing disappointed horrible mediocre poor boring
useless overpriced dull unpleasant shoddy frustrating frustrated miserable rubbish annoying
annoyed flimsy dirty noisy unreliable bland forgettable sloppy tiresome appalling lousy
worse worst sad unhappy angry mad cry cried crying tears hate hated hates rude lazy
foolish stupid ugly mean cruel scared afraid fear frightened lonely lost broken hurt hurts
pain sick ill tired upset shout shouted shouting kick kicked slam slammed ashamed mess
messy nasty gross waste wasted fail failed failure wrong trouble problem horrid grumpy
cold dark weak guilty jealous selfish dangerous
""".split())

NEGATORS = frozenset("not no never nobody nothing neither nor hardly barely without".split())
_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def counts(text: str) -> tuple[int, int]:
    """(positive hits, negative hits), negation-aware."""
    words = tokens(text)
    pos = neg = 0
    for i, w in enumerate(words):
        polarity = 1 if w in POSITIVE else (-1 if w in NEGATIVE else 0)
        if not polarity:
            continue
        window = words[max(0, i - 3):i]
        if any(x in NEGATORS or x.endswith("n't") for x in window):
            polarity = -polarity
        pos, neg = (pos + 1, neg) if polarity > 0 else (pos, neg + 1)
    return pos, neg


def score(text: str) -> float:
    """Sentiment in [-1, 1]; 0 for text without sentiment words."""
    pos, neg = counts(text)
    return 0.0 if pos + neg == 0 else (pos - neg) / (pos + neg)
