"""Process-level CPU runtime settings for training and generation.

`tune_cpu_allocator()` keeps freed memory inside the process instead of handing it back to
the kernel after every step. Why: with glibc's defaults a training step's large temporaries
(attention scores, saved activations: ~110 MB in the Kimi-VL benchmark step) come from the
top of the heap, the heap is trimmed when they are freed, and the next step page-faults
every page in again (~40k faults and ~0.1 s per step there, single-threaded in the kernel).
Keeping the pages is what PyTorch's CUDA caching allocator does on GPU, and what the usual
CPU advice (jemalloc / tcmalloc via LD_PRELOAD) achieves; `mallopt` does it from inside
the process, without a preload. Measured: benchmarks/kimivl_model.py at 2 threads, both
models faster (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the (reused) heap, larger ones are mmapped
_TRIM_THRESHOLD = (1 << 31) - 1  # never give the heap top back (int max: mallopt takes an int)
_tuned: bool | None = None


def tune_cpu_allocator() -> bool:
    """Make glibc malloc keep freed memory for reuse (idempotent). Returns whether it applied:
    False off Linux/glibc (macOS, musl), where nothing is changed."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _tuned
