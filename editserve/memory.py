"""Giving freed heap memory back to the operating system (glibc's ``malloc_trim``).

A process that computes edits for months — the sidecar, or `bench/lifelong.py` — allocates and frees
tensors of a few to tens of MiB on every edit (float64 [d_in, d_in] Gram matrices and null-space
projections, activations, merged weights). glibc serves large allocations with mmap, but after the
first free of such a chunk it raises its mmap threshold (up to 32 MiB on 64-bit), so later ones come
from the heap, and freed heap memory below a live allocation is kept by the process. Nothing leaks,
yet the resident size only grows: a lifelong benchmark process reached 10–11 GB after a few hundred
AlphaEdit commits on SmolLM2-135M, and `malloc_trim(0)` on one at 100 commits took it from 1.90 GB
to 1.19 GB (docs/lifelong.md, "Memory").

`trim_heap` asks glibc to return free heap pages. It is cheap next to an edit (milliseconds) and a
no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)


def trim_heap() -> bool:
    """``malloc_trim(0)``: return free heap memory to the OS. True when it ran (glibc), False when the
    C library has no such call (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
