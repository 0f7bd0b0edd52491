"""Flat memory for long jobs on glibc: large buffers go straight back to the system.

glibc's malloc serves requests above a threshold with mmap and returns them on
free; below it they come from the heap, which fragments. The threshold starts at
128 KB and *rises* each time an mmapped block is freed (up to 32 MB), so after a
few batches a forward pass's activations of a few MB each live in the heap, and a
build's resident memory creeps up with every batch it runs. Fixing the threshold
stops that: with scripts/bench_build.py's peak-memory runs (zfnet, 224 px, 256 vs
1,024 images), the larger build's peak grew 24 % with glibc's default and 0.5-3 %
with a fixed 1 MB threshold; the build then still ran at 0.98 of the bare forward
pass (the largest activations were mmapped either way).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
THRESHOLD = 1 << 20
_done = False


def keep_memory_flat() -> bool:
    """Fix glibc's mmap threshold for this process (once); False where that does not apply."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False  # another libc, or the user chose a setting of their own
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return _done
