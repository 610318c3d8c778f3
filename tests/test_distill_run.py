"""End-to-end distillation runs on a synthetic curated directory: every method, metrics and config
files, teacher cache reuse/refusal, kill-and-resume equivalence, the CLI, and 2 Ray Train workers."""
from __future__ import annotations

import json

import pytest
import torch

import distill.run
from distill.cli import main
from distill.config import DistillConfig
from distill.methods import METHODS
from distill.run import run_distill
from index.core.atomic import FingerprintMismatch
from index.core.config import from_mapping

from fixtures_curated import write_curated_dir


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # deterministic float math across machines


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    d = tmp_path_factory.mktemp("curated")
    qs = write_curated_dir(d, num_classes=3, shots=4, transfer=24, test_per_class=4, size=24, shard_size=10)
    return d, qs


def _cfg(curated, out, **kw) -> DistillConfig:
    args = dict(method="kd", transfer=str(curated[0]), queries="synthetic", out=str(out), teacher="test-tiny-timm",
                student="test-tiny-student", resolution=16, batch_size=8, transfer_epochs=1, finetune_epochs=2,
                probe_steps=30, progress=False, eval_batch_size=16)
    args.update(kw)
    return DistillConfig(**args)


def _weights(out):
    return torch.load(out / "student.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("method", METHODS.names())
def test_end_to_end_every_method(curated, tmp_path, method):
    out = tmp_path / method
    m = run_distill(_cfg(curated, out, method=method), query_set=curated[1])
    assert m["completed"] and 0.0 <= m["test_accuracy"] <= 1.0 and m["num_test"] == 12
    assert set(m["per_class_accuracy"]) == {"class0", "class1", "class2"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test_accuracy"] == m["test_accuracy"] and saved["config"]["method"] == method
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["config"]["student"] == "test-tiny-student" and resolved["resolved"]["resolution"] == 16
    phases = [p["name"] for p in m["training"]["phases"]]
    if method == "labels_only":
        assert phases == ["finetune"] and "teacher_accuracy" not in m
        assert m["baseline_accuracy"] == m["test_accuracy"]
    else:
        assert phases == ["transfer", "finetune"]
        assert m["teacher_accuracy"] > 0.5          # the probe separates the synthetic colours (chance 1/3)
        assert m["training"]["phases"][0]["steps"] == 3    # 24 crops / batch 8
    assert all(len(v) >= 1 for v in m["epoch_seconds"].values())
    assert ("aft_mu" in m["training"]) == (method == "aft")    # only a method with learned feature weights
    if method == "aft":
        mu = m["training"]["aft_mu"]
        assert 0.0 < mu["min"] <= mu["max"] < 1.0 and mu["min"] != mu["max"]   # s was learned


def test_baseline_flag_and_teacher_cache_reuse_and_refusal(curated, tmp_path):
    cache = tmp_path / "cache"
    m1 = run_distill(_cfg(curated, tmp_path / "a", cache_dir=str(cache), baseline=True), query_set=curated[1])
    assert m1["caches"]["transfer_logits:0"]["reused"] is False
    assert isinstance(m1["baseline_accuracy"], float)
    assert (tmp_path / "a" / "baseline" / "metrics.json").exists()
    m2 = run_distill(_cfg(curated, tmp_path / "b", cache_dir=str(cache)), query_set=curated[1])
    assert m2["caches"]["transfer_logits:0"]["reused"] is True
    # another teacher head (stronger L2 penalty) must not silently reuse the logits of the first
    with pytest.raises(FingerprintMismatch, match="different configuration"):
        run_distill(_cfg(curated, tmp_path / "c", cache_dir=str(cache), probe_weight_decay=1.0),
                    query_set=curated[1])


def test_one_cache_dir_serves_several_transfer_sets(curated, tmp_path):
    """A shared --cache-dir keys teacher outputs by transfer set: a second set is computed, not refused,
    and each set's outputs are reused on a rerun."""
    other = tmp_path / "other"
    write_curated_dir(other, num_classes=3, shots=4, transfer=16, test_per_class=4, size=24, shard_size=10, seed=1)
    cache = str(tmp_path / "cache")
    a = run_distill(_cfg(curated, tmp_path / "a", cache_dir=cache), query_set=curated[1])
    b = run_distill(_cfg((other, curated[1]), tmp_path / "b", cache_dir=cache), query_set=curated[1])
    ca, cb = a["caches"]["transfer_logits:0"], b["caches"]["transfer_logits:0"]
    assert ca["dir"] != cb["dir"] and not cb["reused"] and cb["count"] == 16
    again = run_distill(_cfg((other, curated[1]), tmp_path / "c", cache_dir=cache), query_set=curated[1])
    assert again["caches"]["transfer_logits:0"]["reused"] is True


def test_killed_run_resumes_to_the_same_weights(curated, tmp_path):
    """kd: transfer 3 steps/epoch x 2 epochs, then finetune 2 steps/epoch x 3 epochs; checkpoints
    every 2 steps; killed at step 5 (transfer) and at step 9 (finetune), resumed each time."""
    kw = dict(transfer_epochs=2, finetune_epochs=3, checkpoint_every=2, seed=3)
    ref = run_distill(_cfg(curated, tmp_path / "ref", **kw), query_set=curated[1])
    out = tmp_path / "killed"
    first = run_distill(_cfg(curated, out, stop_at_step=5, **kw), query_set=curated[1])
    assert first["completed"] is False and not (out / "student.pt").exists()
    second = run_distill(_cfg(curated, out, stop_at_step=9, **kw), query_set=curated[1])
    assert second["completed"] is False
    assert second["training"]["phases"][0]["resumed_from"] == 4     # last checkpoint before the kill
    final = run_distill(_cfg(curated, out, **kw), query_set=curated[1])
    assert final["training"]["phases"][0]["reused"] is True
    assert final["training"]["phases"][1]["resumed_from"] == 2
    a, b = _weights(tmp_path / "ref"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert final["test_accuracy"] == ref["test_accuracy"]


def test_resume_refuses_another_configuration(curated, tmp_path):
    out = tmp_path / "r"
    run_distill(_cfg(curated, out, method="labels_only", checkpoint_every=1, stop_at_step=2), query_set=curated[1])
    with pytest.raises(FingerprintMismatch):
        run_distill(_cfg(curated, out, method="labels_only", lr=1e-2), query_set=curated[1])


def test_cli_writes_config_and_prints_one_summary_line(curated, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(distill.run, "get_query_set", lambda name, data_root=None, seed=0: curated[1])
    out = tmp_path / "cli"
    rc = main(["--method", "labels_only", "--transfer", str(curated[0]), "--queries", "synthetic", "--out", str(out),
               "--student", "test-tiny-student", "--resolution", "16", "--batch-size", "8", "--finetune-epochs", "1",
               "--no-progress"])
    assert rc == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("distill ")]
    assert len(lines) == 1 and "test accuracy" in lines[0] and "baseline" in lines[0]
    assert json.loads((out / "config.json").read_text())["config"]["finetune_epochs"] == 1
    assert main(["--method", "kdd", "--transfer", "x", "--queries", "y", "--out", str(out)]) == 2
    assert "Did you mean 'kd'" in capsys.readouterr().err


def test_several_workers_need_a_launcher_and_use_the_one_passed_in(curated, tmp_path):
    from distill.training import train_student

    with pytest.raises(ValueError, match="launcher"):
        run_distill(_cfg(curated, tmp_path / "none", method="labels_only", workers=2), query_set=curated[1])
    assert not (tmp_path / "none").exists()                 # refused before any work
    calls = []

    def in_process(cfg: dict, num_workers: int) -> dict:   # stands in for Ray Train: one worker, same body
        calls.append(num_workers)
        return train_student(from_mapping(DistillConfig, cfg))

    m = run_distill(_cfg(curated, tmp_path / "fake", method="labels_only", workers=2, finetune_epochs=1),
                    query_set=curated[1], launcher=in_process)
    assert calls == [2] and m["completed"] and (tmp_path / "fake" / "student.pt").is_file()


def test_distill_library_modules_never_import_jobs():
    """The cluster stays in jobs/: only the command line (an entry point) may import it to pass a launcher."""
    import ast
    from pathlib import Path

    import distill

    offenders = []
    for path in sorted(Path(distill.__file__).parent.glob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "jobs" or n.startswith("jobs.")]
    assert not offenders


@pytest.mark.slow
def test_two_ray_train_workers(curated, tmp_path, without_ray):
    from jobs.train_ray import train_with_ray

    m = run_distill(_cfg(curated, tmp_path / "ray", workers=2, finetune_epochs=1), query_set=curated[1],
                    launcher=train_with_ray)
    assert m["completed"] and m["training"]["world"] == 2
    transfer, finetune = m["training"]["phases"]
    assert transfer["steps"] == 2 and finetune["steps"] == 1    # 24 crops / 2 ranks / batch 8; 12 labels / 2 / 8
    assert 0.0 <= m["test_accuracy"] <= 1.0


def test_teacher_finetune_trains_the_whole_model_and_is_reused(curated, tmp_path):
    from distill.data import load_labelled
    from distill.adaptation import prepare_teacher
    from distill.teachers import build_teacher

    cfg = _cfg(curated, tmp_path / "ft", teacher_adapt="finetune", teacher_epochs=1, teacher_batch_size=6,
               teacher_lr=1e-3)
    ls = load_labelled(cfg.transfer)
    teacher, info = prepare_teacher(cfg, ls, torch.device("cpu"))
    fresh = build_teacher("test-tiny-timm", 3)
    changed = [k for k, v in fresh.encoder.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, teacher.encoder.state_dict()[k])]
    assert info["steps"] == 2 and changed
    again, info2 = prepare_teacher(cfg, ls, torch.device("cpu"))
    assert info2["weights_hash"] == info["weights_hash"]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in again.state_dict().items())
