"""The executor interface every stage fans work out over, and its in-process default.

    executor.map(make_worker, tasks, desc, units=None, unit="task") -> results, in task order

The progress bar (tqdm) counts tasks, or with ``units`` (one count per task: the images, pairs or
crops it holds) those, so its count reaches the total of what the step does.

`make_worker()` builds a worker's state once where it runs (encoders from specs, an opened index)
and returns the function applied to each task; tasks and results are plain data. The library never
builds a cluster executor itself: `jobs.executors.make_executor` does (the CLI calls it) and the
result is passed in, so index/ and curation/ import without Ray. `jobs.executors.RayExecutor` has
the same interface.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    def map(self, make_worker: Callable[[], Callable[[T], R]], tasks: Sequence[T], desc: str = "",
            units: Sequence[int] | None = None, unit: str = "task") -> list[R]: ...


def progress_bar(tasks: Sequence, desc: str, units: Sequence[int] | None, unit: str) -> tuple[tqdm, list[int]]:
    """The bar of a fan-out and the count each finished task adds to it."""
    sizes = [1] * len(tasks) if units is None else [int(u) for u in units]
    if len(sizes) != len(tasks):
        raise ValueError(f"units gives {len(sizes)} counts for {len(tasks)} tasks")
    return tqdm(total=sum(sizes), desc=desc, unit=unit, dynamic_ncols=True), sizes


class LocalExecutor:
    """Runs everything in this process, in order."""

    name = "local"

    def map(self, make_worker: Callable[[], Callable[[T], R]], tasks: Sequence[T], desc: str = "",
            units: Sequence[int] | None = None, unit: str = "task") -> list[R]:
        if not tasks:
            return []
        worker = make_worker()
        bar, sizes = progress_bar(tasks, desc, units, unit)
        out = []
        with bar:
            for t, n in zip(tasks, sizes):
                out.append(worker(t))
                bar.update(n)
        return out


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive slices of at most `size` items: the unit of work sent to one worker call."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1; got {size}")
    return [list(items[a:a + size]) for a in range(0, len(items), size)]
