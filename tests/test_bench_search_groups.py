"""bench/search_groups.py in its smoke mode: an interface change cannot silently break the benchmark."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_search_groups_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_search_groups", ROOT / "bench" / "search_groups.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run("smoke", groups=bench.SMOKE_GROUPS, repeats=1, workdir=str(tmp_path))
    (target,) = result["targets"].values()
    assert set(target) == {"value", "goal", "met"} and target["value"] > 0
    runs = result["runs"]
    assert set(runs) == {"shared_2", "shared_4", "own_2", "own_4"}
    # one quantizer: the same lists, the same vectors scanned and found, whatever the group count
    assert runs["shared_2"]["vectors_scanned_per_query"] == runs["shared_4"]["vectors_scanned_per_query"]
    assert runs["shared_2"]["recall_at_50"] == runs["shared_4"]["recall_at_50"]
    assert runs["own_4"]["vectors_scanned_per_query"] > runs["shared_4"]["vectors_scanned_per_query"]
