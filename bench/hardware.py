"""What the hardware allows, measured in the same run as the stage: the compute bound and the CPU cost.

    sgemm_flops(threads)      the float32 matrix-multiply rate (FLOP/s) of this process's threads now
    model_flops(fn, *args)    the FLOPs one call performs (torch's FlopCounterMode: matmuls and
                              convolutions, 2 per multiply-add; elementwise work is not counted)
    Usage                     wall, user and system CPU seconds and minor page faults of a block
    bound_report(...)         a stage's rate against its compute bound, with its CPU time and faults
    bound_targets(name, r)    the targets on a bound_report: of the bound, system / user, faults
    machine()                 cores and CPU model, for a benchmark's JSON
    emit(result, out)         print a benchmark's JSON (and write it to `out` when given)

A stage's compute bound is its FLOPs over the sgemm rate measured beside it: the speed it would run
at if every FLOP ran as fast as a large matrix multiply. Ratios against it are what the benchmarks'
targets hold, beside their ratios against a bare loop, which can share a defect with the pipeline
(page faults from the allocator, for one) and hide it.
"""
from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def sgemm_flops(threads: int | None = None, n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a float32 [n, n] x [n, n] multiply on `threads` torch threads (default: as set);
    the best of repeats filling about `seconds`."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.rand(n, n), torch.rand(n, n)
        torch.mm(a, b)
        best, spent = float("inf"), 0.0
        while spent < seconds:
            t = time.perf_counter()
            torch.mm(a, b)
            dt = time.perf_counter() - t
            best, spent = min(best, dt), spent + dt
        return 2 * n ** 3 / best
    finally:
        torch.set_num_threads(before)


def model_flops(fn: Callable[..., Any], *args: Any) -> int:
    """FLOPs of one call of `fn(*args)` (forward, or a whole training step with its backward)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


@dataclass
class Usage:
    """Wall, user and system seconds and minor page faults of a `with` block (all threads)."""
    wall: float = 0.0
    user: float = 0.0
    system: float = 0.0
    faults: int = 0

    def __enter__(self) -> "Usage":
        self._r = resource.getrusage(resource.RUSAGE_SELF)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        self.add(Usage(time.perf_counter() - self._t, r.ru_utime - self._r.ru_utime,
                       r.ru_stime - self._r.ru_stime, r.ru_minflt - self._r.ru_minflt))

    def add(self, other: "Usage") -> None:
        self.wall += other.wall
        self.user += other.user
        self.system += other.system
        self.faults += other.faults


def bound_report(items: int, flops_per_item: float, sgemm: float, usage: Usage) -> dict[str, Any]:
    """A stage's figures against the hardware: items/s, its compute bound, their ratio, the system
    share of its CPU time and its minor page faults per item."""
    bound = sgemm / flops_per_item
    rate = items / usage.wall
    return {"items_per_s": round(rate, 2), "compute_bound_items_per_s": round(bound, 2),
            "of_compute_bound": round(rate / bound, 3), "user_s": round(usage.user, 3),
            "system_s": round(usage.system, 3),
            "system_over_user": round(usage.system / usage.user, 3) if usage.user else None,
            "faults_per_item": round(usage.faults / items, 1)}


def bound_targets(name: str, report: dict[str, Any], of_bound: float = 0.7, system_share: float = 0.1,
                  faults: float = 10) -> dict[str, dict[str, Any]]:
    """`targets` entries on a `bound_report`: at least `of_bound` of the compute bound, system time at
    most `system_share` of user time, at most `faults` minor page faults per item."""
    share = report["system_over_user"]
    return {f"{name}_of_compute_bound": {"value": report["of_compute_bound"], "goal": f">= {of_bound:g}",
                                         "met": report["of_compute_bound"] >= of_bound},
            f"{name}_system_over_user": {"value": share, "goal": f"<= {system_share:g}",
                                         "met": share is not None and share <= system_share},
            f"{name}_faults_per_item": {"value": report["faults_per_item"], "goal": f"<= {faults:g}",
                                        "met": report["faults_per_item"] <= faults}}


def machine() -> str:
    """The machine a benchmark ran on, for its JSON: cores and CPU model."""
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}"


def emit(result: dict[str, Any], out: str | None = None) -> None:
    """Print a benchmark's result as JSON, and write the same text to `out` when given."""
    text = json.dumps(result, indent=1)
    if out:
        Path(out).write_text(text + "\n")
    print(text)
