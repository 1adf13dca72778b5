"""Giving freed heap memory back to the system (glibc)."""

import sys

import pytest

from bundle.heap import trim


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux's")
def test_trim_returns_the_pages_of_freed_blocks_that_glibc_would_keep():
    blocks = [bytearray(60_000) for _ in range(4000)]  # 240 MB in heap blocks (below glibc's mmap threshold)
    del blocks[::2]  # every other one freed: holes glibc keeps in its heap
    before = _rss_mb()
    assert trim()
    assert before - _rss_mb() > 60, "the freed half (120 MB) should mostly leave the resident set"
    assert len(blocks) == 2000 and all(b[-1] == 0 for b in blocks)  # what is still used is untouched
