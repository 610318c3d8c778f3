"""The C allocator set for tensor work: large buffers kept by the process, not returned to the OS.

glibc serves every allocation above its mmap threshold (128 KiB to 32 MiB, adjusted as it goes) with
a fresh ``mmap`` and gives it back with ``munmap`` when freed, so each forward pass of a CNN maps its
activations anew and touches every page again: one minor page fault per 4 KiB, and on a VM a fault
is expensive. With `tune_allocator`, EfficientNet-Lite0's forward at 224 px runs 1.5x faster on
one thread and on two, with ~100 page faults per crop instead of ~11,000 (docs/results.md, "The
allocator and the compute bound"); starting the process with ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` raised does the same. Results are unchanged: only where memory comes from
changes.

`tune_allocator()` does it in-process through ``mallopt``: no mmap for allocations (``M_MMAP_MAX``
0, so large buffers come from the heap and are reused) and a 1 GiB trim threshold (``M_TRIM_THRESHOLD``:
freed memory stays with the process unless more than that is free at the top of the heap). The
process keeps its peak memory instead of returning it between batches. Every command calls it at
start (`index.core.errors.run_main`), as do Ray workers, the benchmarks and the test session; a
program that embeds the library calls it once at start-up, or starts Python with
``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296`` (glibc reads them at start).
``VFM_MALLOC=default`` leaves glibc's defaults. On another C library (musl, macOS) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30

_done: bool | None = None


def tune_allocator() -> bool:
    """Set glibc's allocator for tensor work (see the module docstring); True when set. Idempotent;
    a no-op on other C libraries or with ``VFM_MALLOC=default``."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("VFM_MALLOC", "").lower() == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    _done = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
