"""Progress and time: a fan-out's bar counts what its tasks hold and reaches its total; the summary
lines name the largest parts of a command's time."""
from __future__ import annotations

import re

import pytest

from curation.timing import Clock, most_time
from index.core.executor import LocalExecutor


def _final_counts(err: str) -> list[str]:
    return re.findall(r"(\d+/\d+) \[", err.replace("\r", "\n"))


def test_a_bar_counts_units_and_reaches_its_total(capsys):
    tasks = [[1, 2, 3], [4], [5, 6, 7]]
    got = LocalExecutor().map(lambda: sum, tasks, desc="verify pairs", units=[len(t) for t in tasks], unit="pair")
    assert got == [6, 4, 18]
    err = capsys.readouterr().err
    assert "verify pairs" in err and "pair" in err and _final_counts(err)[-1] == "7/7"
    LocalExecutor().map(lambda: len, tasks, desc="plain")
    assert _final_counts(capsys.readouterr().err)[-1] == "3/3"      # without units: tasks
    with pytest.raises(ValueError, match="2 counts for 3 tasks"):
        LocalExecutor().map(lambda: len, tasks, units=[1, 2])


def test_most_time_names_the_three_largest_parts():
    assert most_time({"a": 1.0, "b": 5.0, "c": 0.0, "d": 3.0, "e": 2.0}) == " (most time: b 5.0 s, d 3.0 s, e 2.0 s)"
    assert most_time({"idle": 0.0}) == ""
    clock = Clock()
    clock.lap("x")
    clock.lap("y")
    clock.lap("x")
    assert set(clock.parts) == {"x", "y"} and all(v >= 0 for v in clock.parts.values())
