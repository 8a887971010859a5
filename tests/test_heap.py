"""Giving the heap freed by the analysis' passes back to the system (`workbench.threads.release_free_heap`)."""

import os
import sys

import pytest

from workbench.threads import release_free_heap


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux")
def test_release_free_heap_gives_freed_heap_back_to_the_system():
    """Freed blocks between live ones stay in the process (glibc cannot shrink its heap past a live block) until
    `release_free_heap`, which hands their pages back."""
    blocks = [bytearray(b"x" * 100_000) for _ in range(3000)]  # under glibc's mmap threshold: on the heap
    for i in range(0, len(blocks) - 1, 2):
        blocks[i] = None
    held = _rss_mb()
    release_free_heap()
    assert held - _rss_mb() > 100  # about 150 MB were freed between live blocks
