"""Giving freed memory back to the system between images.

glibc keeps the pages of freed blocks in its heap, and the images of a long run free blocks of ever different sizes
(logits, masks, embeddings read back), so a process's resident memory creeps up with the cohort although nothing is
kept. ``trim`` after each image returns those pages and keeps the footprint flat. A no-op without glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["trim"]


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def trim() -> bool:
    """Return the C heap's free pages to the system; False where the C library cannot (not glibc)."""
    return bool(_TRIM is not None and _TRIM(0) >= 0)
