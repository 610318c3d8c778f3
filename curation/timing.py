"""Where a command's time went: named parts measured lap by lap, and the summary line's account.

    clock = Clock(); ...; clock.lap("teacher"); ...; clock.lap("training")
    most_time(clock.parts) -> " (most time: training 80.2 s, teacher 12.0 s, evaluation 3.1 s)"
"""
from __future__ import annotations

import time


class Clock:
    """Seconds spent in each named part, measured from the previous lap (or the clock's start)."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        t = time.perf_counter()
        self.parts[name] = self.parts.get(name, 0.0) + t - self._t
        self._t = t


def most_time(parts: dict[str, float], top: int = 3) -> str:
    """The ``top`` largest parts, for a summary line (empty when none took any time)."""
    big = sorted(((v, k) for k, v in parts.items() if v > 0), reverse=True)[:top]
    return " (most time: " + ", ".join(f"{k} {v:.1f} s" for v, k in big) + ")" if big else ""
