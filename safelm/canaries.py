"""Canaries: random secrets planted in a language model's training split (``privacy.canaries``).

The privacy audit (``safelm audit privacy``) measures how much a trained model gives away about
data it saw, and the cleanest measurement is a secret whose prior is known exactly: "my secret
code is 3 9 1 4 7 2", its six digits drawn uniformly from 10^6 possibilities (Carlini et al.,
"The Secret Sharer", 2019). Each secret is inserted ``privacy.canary_repeats`` times; the audit
ranks it by the model's likelihood among random candidates of the same form. A model that did
not memorize it ranks it uniformly at random (about 1.4 bits of exposure on average).

Decisions:

* Two inclusion modes (``privacy.canary_inclusion``). ``all`` (the default, also when unset):
  every secret is inserted, secrets come from ``train.seed`` alone (``numpy``
  ``default_rng([SALT, seed])``), so a resumed run inserts the same ones; the exposure audit
  uses them. ``bernoulli``: each of the M secrets is inserted with probability 1/2 by an
  independent fair coin, and both the secrets and the coins come from the OS (``secrets``),
  never from a seed: the one-run audit (``audits/privacy/one_run.py``) is valid only if the
  training code cannot know the coins, and a secret derivable from a published seed would be
  guessable. A resumed run reads secrets and coins back from ``canaries.json``.
* ``canaries.json`` (the run dir only; ``safelm release`` never copies it) records the secrets
  and, for ``bernoulli``, the inclusion record ``included`` (one bool per secret): knowing it
  tells which canaries trained the model, so it is as sensitive as the secrets.
* They join the train split *after* the tokenizer is trained. The tokenizer is not trained
  privately and ships with the model; trained on ten copies of a secret, BPE could merge its
  digits into tokens of their own, so ``tokenizer.json`` would leak the secret around DP-SGD and
  the secret would tokenize unlike its candidates, biasing the audit's rank.
* Each copy is its own row (example id ``canary<i>-<r>``); with a user column the copies of one
  secret belong to one user ``canary<i>``, the way a real secret recurs in one person's texts.
  Group columns get ``unknown``. Under example-level DP a secret repeated k times is protected
  as a group of k (epsilon grows about k-fold), which is what the audit then tests.
"""

from __future__ import annotations

import secrets as _os_random
from typing import Any

import numpy as np
import pandas as pd

from .data import UNKNOWN_GROUP

CANARIES_FILE = "canaries.json"
PREFIX = "my secret code is"
ALPHABET = "0123456789"
LENGTH = 6  # secret space: 10**6 digit strings
SEPARATOR = " "  # digits spaced out, so each is its own token whatever the tokenizer learned
SALT = 0xCA7A  # keeps canary draws independent of every other use of train.seed


def random_secrets(rng: np.random.Generator, n: int, *, alphabet: str = ALPHABET,
                   length: int = LENGTH, separator: str = SEPARATOR) -> list[str]:
    """``n`` secrets drawn uniformly (with replacement) from ``alphabet ** length``."""
    symbols = rng.integers(0, len(alphabet), size=(n, length))
    return [separator.join(alphabet[i] for i in row) for row in symbols]


def make_secrets(n: int, seed: int) -> list[str]:
    """``n`` distinct secrets, a deterministic function of ``seed``."""
    rng = np.random.default_rng([SALT, seed])
    out: list[str] = []
    while len(out) < n:
        for s in random_secrets(rng, n - len(out)):
            if s not in out:
                out.append(s)
    return out


def os_secrets(n: int, *, alphabet: str = ALPHABET, length: int = LENGTH,
               separator: str = SEPARATOR) -> list[str]:
    """``n`` distinct secrets drawn from the OS's entropy (``secrets``): nothing can replay them."""
    out: list[str] = []
    while len(out) < n:
        s = separator.join(_os_random.choice(alphabet) for _ in range(length))
        if s not in out:
            out.append(s)
    return out


def bernoulli_draw(n: int) -> dict[str, Any]:
    """Secrets and fair inclusion coins for ``bernoulli`` mode, all from OS entropy."""
    return {"secrets": os_secrets(n), "included": [bool(_os_random.randbits(1))
                                                   for _ in range(n)]}


def canary_text(secret: str, prefix: str = PREFIX) -> str:
    return f"{prefix} {secret}"


def canary_rows(train: pd.DataFrame, secrets: list[str], repeats: int,
                included: list[bool] | None = None) -> pd.DataFrame:
    """Rows shaped like ``train`` (same columns) holding each secret ``repeats`` times (only
    the secrets whose ``included`` flag is set, when given; ids keep the secret's index)."""
    rows = []
    for i, secret in enumerate(secrets):
        if included is not None and not included[i]:
            continue
        for r in range(repeats):
            row: dict[str, Any] = {c: UNKNOWN_GROUP for c in train.columns}
            row.update(example_id=f"canary{i}-{r}", text=canary_text(secret))
            if "user" in train.columns:
                row["user"] = f"canary{i}"
            if "split" in train.columns:
                row["split"] = "train"
            if "label" in train.columns:
                row["label"] = ""
            rows.append(row)
    return pd.DataFrame(rows, columns=train.columns)


def insert_canaries(train: pd.DataFrame, n: int, repeats: int, seed: int,
                    inclusion: str = "all", previous: dict[str, Any] | None = None,
                    draw: dict[str, Any] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The train split with the canary rows appended, and the ``canaries.json`` record.

    ``inclusion="bernoulli"`` takes secrets and coins from ``previous`` (a resumed run's
    ``canaries.json``), else from ``draw`` (one :func:`bernoulli_draw`, shared by all ranks),
    else draws them now. Appending is enough: the Trainer draws batches in a random order
    (Poisson sampling under DP), so a row's position in the table does not matter.
    """
    record: dict[str, Any] = {"prefix": PREFIX, "alphabet": ALPHABET, "length": LENGTH,
                              "separator": SEPARATOR, "space_size": len(ALPHABET) ** LENGTH,
                              "repeats": repeats, "inclusion": inclusion}
    if inclusion == "bernoulli":
        got = previous or draw or bernoulli_draw(n)
        secrets, included = list(got["secrets"]), [bool(x) for x in got["included"]]
        if len(secrets) != n or len(included) != n:
            raise ValueError(f"canary record holds {len(secrets)} secrets, config says {n}")
        record.update(randomness="os_entropy", included=included)
    else:
        secrets, included = make_secrets(n, seed), None
        record.update(seed=seed)
    extra = canary_rows(train, secrets, repeats, included)
    record.update(secrets=secrets, texts=[canary_text(s) for s in secrets],
                  example_ids=[[f"canary{i}-{r}" for r in range(repeats)]
                               for i in range(len(secrets))],
                  inserted="train split, after tokenizer training")
    return pd.concat([train, extra], ignore_index=True), record
