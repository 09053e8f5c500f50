"""CPU allocator tuning.

On Linux, glibc serves allocations above its mmap threshold (at most 32 MB) with fresh `mmap`s
and returns them to the system on free, so every large activation tensor is page-faulted and
zeroed by the kernel again. For EnCodec at batch 8 x 5 s that is about half of CPU encode time on
the machines we measured (see bench/). `tune_cpu_allocator()` raises the mmap and trim thresholds
so freed memory is kept and reused: faster, at the price of keeping the process's peak heap.
It changes the whole process; the `encodec-fast` command calls it, the library does not unless
asked.
"""

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_cpu_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Keep freed memory in the heap (glibc `mallopt`). Returns False where not applicable."""
    global _tuned
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    _tuned = _tuned or ok
    return ok


def is_tuned() -> bool:
    return _tuned
