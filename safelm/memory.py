"""Keep freed heap memory in the training process between steps (glibc's ``mallopt``).

Why: a training step allocates its activations (and, under DP, each layer's kept input and
output gradient or per-sample gradient) and frees them at the end of the step. With glibc's
defaults every block above the mmap threshold (at most 32 MiB) is ``mmap``-ed and unmapped
again, and the top of the heap is trimmed, so that memory goes back to the operating system
and the next step page-faults all of it in again (the kernel zeroes each 4 KiB page). At the
demo shape that is 30-50 thousand faults a DP step, ~15% of its time; at long contexts, where
most activations exceed 32 MiB, it is most of the memory of every step, plain or private:
context 256, width 256, batch 128 took 4.5 s a plain step and 5.8 s a DP step with the
defaults, 3.3 s and 3.6 s with the settings below (``benchmarks/bench_dp.py``; table in
benchmarks/README.md).

So, as PyTorch's caching allocator does on GPUs, freed memory is kept for the next step:

* ``M_MMAP_MAX = 0``: no block is ``mmap``-ed, large ones included; all come from the heap,
  where a freed block is reused by the next step's block of the same size (a thread's arena
  still maps a block larger than its 64 MiB heap: glibc falls back to ``mmap`` there);
* ``M_TRIM_THRESHOLD`` out of reach: the top of the heap is not given back.

The cost is resident memory: the allocated peak does not change, but the heap keeps its
high-water mark until the process exits, with the holes between blocks (fragmentation): the
resident peak read x1.21-1.38 (plain) and x1.28-1.53 (DP) of the allocated peak over
T 256-512, d 128-256, batch 32-128 (benchmarks/README.md) against x1.01-1.2 with the
defaults. So where memory is tight the defaults are kept: when the memory check
(:mod:`safelm.preflight`) finds the estimated step peak times :data:`RESIDENT_FACTOR` above
the memory available, it calls :func:`keep_defaults` (and says so on stderr);
``SAFELM_KEEP_FREED_MEMORY=0`` keeps them always. It changes ``malloc`` for the whole
process, so it is applied where training starts (:class:`safelm.trainer.Trainer`) and only
there. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: about 2 GiB
DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD = 65536, 128 * 1024  # glibc's own defaults
RESIDENT_FACTOR = 1.6  # resident / allocated peak with the settings: at most x1.53 measured

_declined: str | None = None  # why the defaults are kept in this process (keep_defaults)


def keep_defaults(reason: str | None) -> None:
    """Keep (or restore) glibc's defaults in this process until the next call: trainings
    started meanwhile do not apply the settings (``reason``: why, see :func:`declined`).
    ``None`` lifts that: the memory check of a run with room to spare calls it."""
    global _declined
    _declined = reason
    mallopt = _mallopt() if reason is not None else None
    if mallopt is not None:
        mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)


def declined() -> str | None:
    """Why this process keeps glibc's defaults (None: it does not, or was not asked)."""
    return _declined


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_freed_memory() -> bool:
    """Apply the settings (idempotent); True when glibc accepted them. Not applied (False)
    under ``SAFELM_KEEP_FREED_MEMORY=0``, after :func:`keep_defaults`, or off glibc."""
    if os.environ.get("SAFELM_KEEP_FREED_MEMORY", "1") == "0" or _declined is not None:
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
