"""glibc malloc settings for CPU inference.

By default glibc serves large blocks with mmap and hands freed memory back to the OS, so every
step's multi-megabyte activations are page-faulted in anew. Raising both thresholds keeps them
in the heap: torch's RMSNorm at [2048, 576] went from 3.8 ms to 0.35 ms, and offline throughput
rose about 6% (measured on this project's 2-core machines).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30


def keep_freed_memory_in_heap() -> bool:
    """Apply the settings; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1
    if not ok:
        logger.debug("mallopt refused the thresholds")
    return ok
