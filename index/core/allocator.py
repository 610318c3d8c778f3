"""The C allocator set for tensor work: large buffers kept by the process, not returned to the OS.

glibc serves every allocation above its mmap threshold (128 KiB to 32 MiB, adjusted as it goes) with
a fresh ``mmap`` and gives it back with ``munmap`` when freed, so each forward pass of a CNN maps its
activations anew and touches every page again: one minor page fault per 4 KiB, and on a VM a fault
is expensive. EfficientNet-Lite0 at 224 px, batch 32, one thread, measured side by side on this
project's 2-core machine: 6.5-7.0 img/s with about 22,000 faults per image and more system than user
time by default; 12.3-13.1 img/s with about 300 faults per image and no system time after
`tune_allocator` (the same as starting the process with ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` raised). Results are unchanged: only where memory comes from changes.

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
