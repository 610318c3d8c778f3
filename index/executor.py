"""The executor interface every stage fans work out over, and its in-process default.

    executor.map(make_worker, tasks, desc) -> results, in task order

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
    def map(self, make_worker: Callable[[], Callable[[T], R]], tasks: Sequence[T], desc: str = "") -> list[R]: ...


class LocalExecutor:
    """Runs everything in this process, in order."""

    name = "local"

    def map(self, make_worker: Callable[[], Callable[[T], R]], tasks: Sequence[T], desc: str = "") -> list[R]:
        if not tasks:
            return []
        worker = make_worker()
        return [worker(t) for t in tqdm(tasks, desc=desc, unit="task")]


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive slices of at most `size` items: the unit of work sent to one worker call."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1; got {size}")
    return [list(items[a:a + size]) for a in range(0, len(items), size)]
