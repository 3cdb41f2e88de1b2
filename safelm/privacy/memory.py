"""Keep freed heap memory in the process between DP steps (glibc's ``mallopt``).

Why: exact one-backward clipping (:mod:`safelm.privacy.bk`) keeps every layer's input and
output gradient until the clip factors are known, so each DP step grows the heap by 100-200 MB
(demo LM, batch 128) and frees it at the end of the step. With glibc's defaults large blocks
are ``mmap``-ed and unmapped, and the top of the heap is trimmed, so all of it goes back to the
operating system and the next step page-faults it in again: 30-50 thousand faults a step,
about 15% of a DP step's time on this CPU, where a non-private step faults not at all.
Raising the mmap threshold to glibc's maximum (32 MiB) and the trim threshold out of reach
keeps the memory for the next step, as PyTorch's caching allocator does on GPUs. The peak does
not grow (it is the same high-water mark); the process keeps it until it exits, which is what
a training process does anyway.

It changes ``malloc`` for the whole process, so it is applied where DP training starts and only
there; ``SAFELM_KEEP_FREED_MEMORY=0`` turns it off. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: about 2 GiB


def keep_freed_memory() -> bool:
    """Apply the thresholds once; True when glibc accepted them."""
    if os.environ.get("SAFELM_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith(
            "linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
