"""glibc's malloc, kept from hoarding the large blocks the gateway frees.

The CoAP reply cache holds ~165,000 entries at 40,000 devices (one per exchange, kept
EXCHANGE_LIFETIME); its dict rebuilds its ~10 MB table every few minutes as entries come
and go. glibc serves such a block with mmap and gives it back with munmap, but the first
munmap raises its mmap threshold to the block's size (the "dynamic threshold", up to
32 MiB), so every later table comes from the heap instead, and small allocations made
meanwhile pin the holes the old tables leave: an hour's soak read +10 MB steps in the
heap while Python's own live blocks stayed flat (docs/decisions.md, "The soak's RSS
steps"). Setting the threshold explicitly turns the dynamic rule off: blocks of
MMAP_THRESHOLD_BYTES and more always map and unmap, and their memory goes back to the
system when they are freed.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
# Only large blocks map: the hot path's lists and buffers stay well below a MiB, so they
# keep coming from the heap without a system call each.
MMAP_THRESHOLD_BYTES = 1 << 20


def operator_set_threshold(environ: Mapping[str, str]) -> bool:
    """The operator chose the threshold, through glibc's own environment: leave it."""
    return ("MALLOC_MMAP_THRESHOLD_" in environ
            or "glibc.malloc.mmap_threshold" in environ.get("GLIBC_TUNABLES", ""))


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES. False, changing nothing, where
    the operator set malloc's tunables or the C library has no mallopt (not glibc)."""
    if operator_set_threshold(os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
