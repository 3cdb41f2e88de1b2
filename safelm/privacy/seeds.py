"""Seeds of DP randomness: one secret per run, mixed into independent streams.

The secret (``secrets.randbits(63)``, or ``train.seed`` under ``privacy.reproducible=true``) is
never used raw: each use (the noise, the Poisson draw of epoch ``e``, the user draw of epoch
``e``) gets its own 63-bit seed from numpy's ``SeedSequence`` hash of ``(secret, use, ...)``, so
streams do not overlap and any 63-bit secret fits torch's ``manual_seed``.
"""

from __future__ import annotations

import numpy as np

NOISE, POISSON, USERS = 1, 2, 3  # the uses


def derive(secret: int, *words: int) -> int:
    """A 63-bit seed for one use of ``secret``."""
    state = np.random.SeedSequence([secret % 2**63, *words]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))
