"""Process-level tuning used by the command line (never applied on library import)."""

from __future__ import annotations

import ctypes
import os

__all__ = ["tune_glibc_malloc"]


def tune_glibc_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Make glibc keep freed tensor memory instead of returning it to the kernel.

    By default glibc serves blocks above a (dynamic) threshold with fresh ``mmap`` pages and
    trims the heap when more than twice that is free, so a loop that allocates and frees
    multi-MiB tensors (the aggregation bottlenecks at 64x64) page-faults its memory back in at
    every iteration. Raising both thresholds (the same as ``GLIBC_TUNABLES=glibc.malloc.
    mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456``) keeps up to
    ``trim_threshold`` bytes of freed memory resident; measured on a 2-core CPU it cuts the
    aggregation of an SD 1.5 pair from 3.3 s to 2.0 s (``benchmarks/descriptor_cost.py``).

    Process-wide. The ``hyperfeatures`` command calls it at start-up unless
    ``HYPERFEATURES_DEFAULT_MALLOC=1``. Returns False where ``mallopt`` is unavailable
    (non-glibc systems) or the variable opts out.
    """
    if os.environ.get("HYPERFEATURES_DEFAULT_MALLOC", "0") not in ("", "0"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok_mmap = mallopt(m_mmap_threshold, int(mmap_threshold)) == 1
    ok_trim = mallopt(m_trim_threshold, int(trim_threshold)) == 1
    return ok_mmap and ok_trim
