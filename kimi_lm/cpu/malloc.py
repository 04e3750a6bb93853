"""glibc malloc settings for CPU inference: keep freed activation memory in the process instead of unmapping it.

Every forward pass allocates and frees the same few-MB activation buffers. glibc serves blocks above its mmap
threshold (128 KiB at start, adapted upwards as blocks are freed) with fresh ``mmap`` pages and gives freed heap
tops back to the OS (``M_TRIM_THRESHOLD``), so each forward pays page faults to zero memory it just released: on the
benchmark config a 1024-token prefill spent about a quarter of its time in the kernel. Raising the mmap threshold to
its 32 MiB maximum and the trim threshold to 1 GiB keeps those pages mapped and reused (the same effect as the
jemalloc/tcmalloc preloads CPU inference guides recommend, without a preload). The cost: up to 1 GiB of freed heap
stays with the process.

Process-wide and idempotent; a no-op where the C library is not glibc. Set ``KIMI_LM_MALLOC=default`` to skip it.
``release_free_memory`` hands freed heap pages back once, and ``ReleaseEvery`` does so each time a given amount
was freed: the loader uses them for its read buffers and for the plain weights that packing replaces, so that
loading stays near the model's own size instead of keeping those freed pages too.

Reference: ``mallopt(3)`` (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD), ``malloc_trim(3)``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20

_applied = False


@functools.cache
def _libc():
    """glibc's handle, or None where the C library is something else (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int  # glibc only
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS now (``malloc_trim(0)``); True when something was released."""
    libc = _libc()
    if libc is None:
        return False
    return libc.malloc_trim(0) == 1


def keep_freed_memory() -> bool:
    """Apply the settings once per process; returns True when they are in effect."""
    global _applied
    if _applied:
        return True
    if os.environ.get("KIMI_LM_MALLOC", "") == "default":
        return False
    libc = _libc()
    if libc is None:  # not glibc: nothing to tune
        return False
    _applied = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    return _applied


class ReleaseEvery:
    """Hands freed heap pages back to the OS (``release_free_memory``) each time ``limit`` bytes were freed."""

    def __init__(self, limit: int):
        self.limit, self.pending = limit, 0

    def freed(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.limit:
            release_free_memory()
            self.pending = 0
