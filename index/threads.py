"""How many CPU threads a command computes with, so that it shares a busy machine instead of fighting it.

torch's default is one intra-op thread per core. Beside another CPU-bound process that is one thread
too many: every parallel op waits at its barrier for the thread that shares a core with the other
process, and a small model runs thousands of such ops a step (10-25x slower, measured by
bench/shared_cpu.py). `choose_threads` takes the cores this process may run on
(``os.sched_getaffinity``) minus those other processes keep busy (sampled from /proc/stat over a
fraction of a second; the 1-minute load average where that is not available), at least 1.

An explicit count wins: ``--threads N`` on a command, else ``OMP_NUM_THREADS``. Float results can
depend on the thread count, so a run meant to be byte-identical to another (a resumed run on a
machine whose load changed, say) should fix it.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Iterator

import torch

from index.core.errors import ConfigError

ENV = "OMP_NUM_THREADS"
HELP = "CPU threads for torch and faiss (default: the CPUs other processes leave free, or $OMP_NUM_THREADS)"


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cpus(sample_seconds: float = 0.25) -> float:
    """How many CPUs other processes keep busy now (this process is idle while it samples)."""
    a = _cpu_times()
    if a is not None:
        time.sleep(sample_seconds)
        b = _cpu_times()
        if b is not None and b[1] > a[1]:
            return (os.cpu_count() or 1) * (b[0] - a[0]) / (b[1] - a[1])
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def choose_threads(requested: int | None = None, *, busy: float | None = None, cpus: int | None = None) -> int:
    """`requested`, else ``$OMP_NUM_THREADS``, else the CPUs left free by other processes (at least 1)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigError(f"threads must be an integer >= 1 (or unset: chosen from the free CPUs); got {requested!r}")
        return requested
    env = os.environ.get(ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ConfigError(f"{ENV}={env!r} is not a number of threads") from None
        if n >= 1:
            return n
    cpus = available_cpus() if cpus is None else cpus
    busy = busy_cpus() if busy is None else busy
    return max(1, min(cpus, cpus - math.floor(busy + 0.5)))   # a core more than half busy is taken


@contextlib.contextmanager
def threads_for(requested: int | None = None) -> Iterator[int]:
    """Compute with `choose_threads(requested)` torch (and faiss OpenMP) threads inside the block, then
    restore the counts before it. Without `requested` the count is never raised above the current
    one (a caller that set 1 thread keeps 1)."""
    before = torch.get_num_threads()
    n = choose_threads(requested) if requested is not None else min(before, choose_threads(None))
    faiss = _faiss()
    faiss_before = faiss.omp_get_max_threads() if faiss else None
    torch.set_num_threads(n)
    if faiss:
        faiss.omp_set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
        if faiss:
            faiss.omp_set_num_threads(faiss_before)


def _faiss():
    try:
        import faiss  # lazy: faiss
        return faiss
    except ImportError:
        return None
