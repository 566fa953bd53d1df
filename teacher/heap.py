"""The collector's C heap: freed memory kept for the next answer instead of returned to the kernel (glibc).

Every answer allocates a few megabytes (the body, the scanner's arrays, the record's arrays) and frees them a
moment later. With glibc's defaults the larger blocks are mapped and unmapped each time and the heap top is
trimmed, so the next answer takes the same memory back one page fault at a time: 250-450 faults and 0.3-0.6 ms of
kernel time per 1,000-token answer (``perf``, ``benchmarks/collect.py --only cpu``). Raising the two thresholds
keeps that memory in the heap, bounded by the collector's peak use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
KEEP_AT_TOP = 256 << 20  # trim the heap top only when this much of it is free
LARGEST_FROM_HEAP = 32 << 20  # blocks up to this size come from the heap: glibc's maximum on 64-bit


@functools.cache
def keep_freed_heap() -> bool:
    """Tune glibc's ``malloc`` for the whole process, once; False where it is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl has a mallopt that does nothing
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, LARGEST_FROM_HEAP)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_AT_TOP)
    )
