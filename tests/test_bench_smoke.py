"""Every bench/ script runs in its smoke mode and prints its JSON result with a `targets` object.

Each script runs in a subprocess with this interpreter and this source tree, as a user runs it, so a
change of a library interface a benchmark calls fails here instead of in the next benchmark run. The
figures of a smoke run are not checked (they are measured on tiny inputs and mean nothing); the
shape of the result is: valid JSON, and a `targets` object whose entries are {"value", "goal", "met"}.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"

# script -> (expected top-level keys besides targets, needs a targets object, slow)
SCRIPTS = {
    "curate.py": (("fraction", "throughput"), True, False),
    "search.py": (("exact", "ivf"), True, False),
    "embed.py": (("ratio", "pipeline_s"), True, False),
    "copydetect.py": (("results", "verifiers"), True, False),
    "distill_bench.py": (("aft_over_labels_only", "kd_over_labels_only"), True, True),
    "quality.py": (("acc_kd_curated", "details"), True, True),
    "scale.py": (("io", "search"), True, True),
    "verify.py": (("sets", "all"), True, False),
    "search_groups.py": (("runs", "own_quantizer_time_ratio"), True, False),
    "shared_cpu.py": (("cases", "slowdown"), True, False),
    "recall.py": (("ours", "autofaiss", "exact_seconds"), True, False),
    "curate_stages.py": (("parts", "usage", "embedding", "essential_s"), True, False),
}


def last_json_object(stdout: str) -> dict:
    """The last top-level JSON object printed (some scripts print progress records before it)."""
    starts = [0] + [i + 1 for i, ch in enumerate(stdout) if ch == "\n" and stdout[i + 1:i + 2] == "{"]
    for s in reversed(starts):
        try:
            return json.loads(stdout[s:])
        except json.JSONDecodeError:
            continue
    raise AssertionError(f"no JSON object at the end of stdout:\n{stdout[-2000:]}")


def run_smoke(script: str) -> dict:
    # as a user's process: without PYTEST_CURRENT_TEST, which turns skimage's failed sample downloads
    # into pytest skips (BaseExceptions) inside the script
    env = {**{k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}, "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True,
                          env=env, cwd=str(REPO), timeout=900)
    assert proc.returncode == 0, f"bench/{script} --smoke exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return last_json_object(proc.stdout)


def test_every_bench_script_has_a_smoke_test():
    scripts = [p.name for p in BENCH.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()]
    assert sorted(scripts) == sorted(SCRIPTS)   # the others are helpers the scripts share (hardware.py)


@pytest.mark.parametrize("script", [pytest.param(s, marks=[pytest.mark.slow] if slow else [])
                                    for s, (_, _, slow) in SCRIPTS.items()])
def test_smoke_mode_runs_and_prints_its_result(script: str):
    keys, needs_targets, _ = SCRIPTS[script]
    out = run_smoke(script)
    missing = [k for k in keys if k not in out]
    assert not missing, f"bench/{script}: result lacks {missing}; has {sorted(out)}"
    if needs_targets or "targets" in out:
        targets = out.get("targets")
        assert isinstance(targets, dict) and targets, f"bench/{script}: no targets object"
        for name, t in targets.items():
            assert set(t) == {"value", "goal", "met"}, f"bench/{script}: target {name} is {t}"
            assert t["met"] in (True, False, None) and isinstance(t["goal"], str), (name, t)


def test_last_json_object_skips_progress_records():
    assert last_json_object('{"a": 1}\n{\n  "b": {\n    "c": 2\n  }\n}\n') == {"b": {"c": 2}}
    with pytest.raises(AssertionError):
        last_json_object("no json here\n")


def _load_quality():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved
    return mod


def test_quality_memo_forwards_every_argument_of_embed_originals(monkeypatch):
    """The memo wraps curation.features.embed_originals (as the curate workers call it) without knowing
    its keywords: a keyword the library adds (here `extra`) reaches it, outputs land in the caller's
    dicts, and a second call for the same images is answered from the memo."""
    import curation.features as features
    import curation.run.stages as stages
    import curation.run.state as state
    import curation.run.workers as workers

    calls = []

    def fake_embed_originals(gindex, models, image_ids, into, batch_size=64, keys_into=None, extra="default"):
        calls.append({"ids": list(image_ids), "batch_size": batch_size, "extra": extra,
                      "keys": keys_into is not None})
        for i in image_ids:
            if i == "s/bad":
                continue
            into[i] = [np.full(2, len(i), np.float32)]
            if keys_into is not None:
                keys_into[i] = np.full(3, len(i), np.float32)
        return {"s/bad": "decode"} if "s/bad" in image_ids else {}

    for module in (state, stages, workers):   # restored after the test
        for name in ("build_encoder", "embed_labeled", "embed_originals"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(features, "embed_originals", fake_embed_originals)
    _load_quality().memoise_curation_features()

    class G:
        root = "/idx"

    class M:
        class spec:
            name = "enc"

    into, keys = {}, {}
    bad = workers.embed_originals(G(), [M()], ["s/a", "s/bad"], into, 16, keys_into=keys, extra="new")
    assert bad == {"s/bad": "decode"}
    assert calls == [{"ids": ["s/a", "s/bad"], "batch_size": 16, "extra": "new", "keys": True}]
    assert set(into) == {"s/a"} and set(keys) == {"s/a"}
    into2, keys2 = {}, {}
    assert workers.embed_originals(G(), [M()], ["s/a", "s/bad", "s/cc"], into2, keys_into=keys2) == {
        "s/bad": "decode"}
    assert calls[-1]["ids"] == ["s/cc"], "memoised images are not embedded again"
    assert set(into2) == {"s/a", "s/cc"} and set(keys2) == {"s/a", "s/cc"}
    with pytest.raises(TypeError):
        workers.embed_originals(G(), [M()], ["s/a"], {}, unknown_keyword=1)


@pytest.mark.slow
def test_gpu_check_dry_run_needs_no_faiss_ray_or_open_clip(tmp_path):
    """bench/gpu_check.sh --dry runs its steps on the CPU at smoke sizes, with faiss, ray and open_clip
    unimportable (the GPU machine it is meant for has none of them), and writes its summary."""
    blocked = tmp_path / "blocked"
    for name in ("faiss", "ray", "open_clip"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "PYTHONPATH": str(blocked),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry"], capture_output=True, text=True,
                          env=env, cwd=str(REPO), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + (out / "log.txt").read_text()[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["device"] == "cpu"
    assert {"embed_l14.crops_per_s", "search_gpu.search_over_gemm_bound"} <= set(summary["targets"])
    for t in summary["targets"].values():
        assert set(t) == {"value", "goal", "met"}
    search = json.loads((out / "search_gpu.json").read_text())
    assert search["same_as_exact_search"] is True  # within float tolerance and ties (index.topk.same_lists)
    embed = json.loads((out / "embed_b32.json").read_text())
    assert embed["crops_on_device"] is True
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files
