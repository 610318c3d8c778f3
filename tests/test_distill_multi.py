"""Several teachers at once, on a synthetic zoo: `test-colour` carries the label signal of the synthetic
images (their classes are colours), `test-noise` is a deterministic function of the pixels with no class
information, `test-tiny-timm` is a random-init CNN. Ranking, `distill rank`, kd_nearest, kd_weighted
(probe and source heads) and multi-source AFT's learned weights per model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.adaptation import labelled_manifest
from distill.cli import main
from distill.config import DistillConfig
from distill.data import load_labelled
from distill.methods import WeightedKD, build_task
from distill.rank import cv_probe_accuracy, rank_teachers
from distill.run import run_distill
from distill.students import build_student
from index.core.config import from_mapping

from fixtures_curated import write_curated_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ZOO = ["test-noise", "test-tiny-timm", "test-colour"]


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    d = tmp_path_factory.mktemp("curated")
    qs = write_curated_dir(d, num_classes=3, shots=6, transfer=24, test_per_class=4, size=24, shard_size=10)
    return d, qs


def _cfg(curated, out, **kw) -> DistillConfig:
    args = dict(method="kd_weighted", transfer=str(curated[0]), queries="synthetic", out=str(out),
                teachers=("test-colour", "test-noise"), student="test-tiny-student", resolution=16, batch_size=8,
                transfer_epochs=1, finetune_epochs=1, probe_steps=30, progress=False, eval_batch_size=16)
    args.update(kw)
    return DistillConfig(**args)


def test_ranking_puts_the_label_carrying_teacher_first_and_reuses_its_caches(curated, tmp_path):
    ls = load_labelled(curated[0])
    data = labelled_manifest(DistillConfig(method="kd", transfer=str(curated[0]), queries="q", out="o"), ls)
    for metric in ("rsa", "cka", "parc"):
        r = rank_teachers(ZOO, ls, data, tmp_path / "cache", metric=metric, probe_accuracy=metric == "parc")
        assert r["ranking"][0]["name"] == "test-colour", (metric, r["ranking"])
        assert [x["rank"] for x in r["ranking"]] == [1, 2, 3]
        by_name = {x["name"]: x for x in r["ranking"]}
        assert by_name["test-colour"]["similarity"][metric] > by_name["test-noise"]["similarity"][metric] + 0.1
        assert set(by_name["test-colour"]["seconds"]) >= {"features", "parc", "cka", "rsa", "total"}
    assert r["by_probe_accuracy"][0] == "test-colour"
    assert by_name["test-colour"]["probe_accuracy"] > by_name["test-noise"]["probe_accuracy"]
    # one pass over the probe set per teacher: the second and third rankings read the cached features
    assert all(x["cache"]["reused"] for x in r["ranking"])


def test_cv_probe_accuracy_holds_out_each_example_once():
    y = np.repeat(np.arange(3), 4)
    assert cv_probe_accuracy(np.eye(3)[y] * 4, y, folds=4, steps=30) == 1.0
    with pytest.raises(ValueError, match="2 examples"):
        cv_probe_accuracy(np.eye(3), np.arange(3))


def test_rank_cli_prints_and_writes_json(curated, tmp_path, capsys):
    out = tmp_path / "rank"
    rc = main(["rank", "--queries", "synthetic", "--transfer", str(curated[0]), "--teachers", ",".join(ZOO),
               "--out", str(out), "--probe-accuracy", "--weight-temperature", "10", "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "teachers ranked by parc" in text and "test-colour" in text and "ranking.json" in text
    saved = json.loads((out / "ranking.json").read_text())
    assert saved["ranking"][0]["name"] == "test-colour" and saved["queries"] == "synthetic"
    assert sum(x["weight"] for x in saved["ranking"]) == pytest.approx(1.0)
    assert main(["rank", "--queries", "synthetic", "--transfer", str(curated[0]), "--teachers", "no-such-model"]) == 2
    assert "unknown encoder" in capsys.readouterr().err


def test_kd_weighted_weights_teachers_by_similarity(curated, tmp_path):
    m = run_distill(_cfg(curated, tmp_path / "w", weight_temperature=10.0), query_set=curated[1])
    assert m["completed"] and 0.0 <= m["test_accuracy"] <= 1.0
    assert m["teacher"] == "test-colour" and m["teacher_accuracy"] > 0.5
    w = {t["name"]: t["weight"] for t in m["teachers"]}
    sims = {r["name"]: r["similarity"]["parc"] for r in m["teacher_ranking"]}
    e = {k: np.exp(10.0 * v) for k, v in sims.items()}
    assert w == pytest.approx({k: v / sum(e.values()) for k, v in e.items()})
    assert w["test-colour"] > w["test-noise"]
    assert set(m["caches"]) == {"transfer_logits:0", "transfer_logits:1"}     # one pass per teacher
    saved = json.loads((tmp_path / "w" / "teachers.json").read_text())
    assert [t["name"] for t in saved["teachers"]] == ["test-colour", "test-noise"]
    losses = m["training"]["phases"][0]["epochs"][0]
    assert {"kd_loss", "kd_loss_0", "kd_loss_1"} <= set(losses)


def test_weight_temperature_zero_is_equal_weights_and_kd_nearest_uses_the_top_teacher_only(curated, tmp_path):
    cache = str(tmp_path / "cache")
    m0 = run_distill(_cfg(curated, tmp_path / "eq", weight_temperature=0.0, cache_dir=cache), query_set=curated[1])
    assert [t["weight"] for t in m0["teachers"]] == [0.5, 0.5]
    mn = run_distill(_cfg(curated, tmp_path / "near", method="kd_nearest", teachers=tuple(ZOO), cache_dir=cache),
                     query_set=curated[1])
    assert [t["name"] for t in mn["teachers"]] == ["test-colour"] and mn["teachers"][0]["weight"] == 1.0
    assert list(mn["caches"]) == ["transfer_logits:0"]
    assert mn["caches"]["transfer_logits:0"]["reused"] is True   # the kd_weighted run cached test-colour's logits
    big = run_distill(_cfg(curated, tmp_path / "big", weight_temperature=1e6, cache_dir=cache), query_set=curated[1])
    assert [t["name"] for t in big["teachers"]] == ["test-colour"]       # exp underflows: nearest, one pass


def test_source_heads_give_pseudo_labels_in_the_teachers_own_label_space(curated, tmp_path):
    m = run_distill(_cfg(curated, tmp_path / "src", teachers=("test-tiny-timm",), teacher_head="source"),
                    query_set=curated[1])
    assert m["completed"] and m["teachers"][0]["outputs"] == 1000 and m["teacher_accuracy"] is None
    with pytest.raises(ValueError, match="no classifier head"):
        run_distill(_cfg(curated, tmp_path / "bad", teacher_head="source"), query_set=curated[1])


def test_weighted_kd_task_sizes_one_auxiliary_head_per_teacher():
    student = build_student("test-tiny-student", 3, resolution=16, seed=0)
    task = WeightedKD(student, [5, 1000], [0.25, 0.75], temperature=2.0)
    assert [h.out_features for h in task.heads] == [5, 1000]
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(4, 3, 16, 16, generator=g), "teacher_logits": torch.randn(4, 1005, generator=g)}
    out = task(batch)
    assert out["kd_loss"].item() == pytest.approx(0.25 * out["kd_loss_0"].item() + 0.75 * out["kd_loss_1"].item(),
                                                  rel=1e-5)
    batch.update(task.matched_targets(batch))
    assert task(batch)["kd_loss"].item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="columns"):
        task({"image": batch["image"], "teacher_logits": torch.zeros(4, 7)})
    assert build_task("kd_weighted", student, _cfg(("x", None), "o"), seed=0).outputs == [3]


def test_multi_source_aft_weights_concentrate_on_the_informative_model(curated, tmp_path):
    m = run_distill(_cfg(curated, tmp_path / "aft", method="aft", teachers=(), teacher="test-colour",
                         feature_encoders=("test-colour", "test-noise"), transfer_epochs=8, finetune_epochs=8),
                    query_set=curated[1])
    w = m["aft_source_weights"]
    assert list(w) == ["test-colour", "test-noise"]
    # measured: colour block 0.59 on average (every weight above its initial 0.5), noise block 0.50
    assert w["test-colour"] > 0.55 and w["test-colour"] > w["test-noise"] + 0.05
    assert m["training"]["aft_mu"]["per_source"][0]["min"] > 0.5
    blocks = m["training"]["aft_mu"]["per_source"]
    assert [b["dim"] for b in blocks] == [12, 16]
    png = tmp_path / "aft" / "aft_source_weights.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_refuses_options_that_would_be_ignored(curated, tmp_path):
    with pytest.raises(ValueError, match="kd_nearest or kd_weighted"):
        _cfg(curated, tmp_path, method="kd")
    with pytest.raises(ValueError, match="teacher_head='source' applies to"):
        _cfg(curated, tmp_path, method="aft", teacher_head="source")
    with pytest.raises(ValueError, match="distinct"):
        _cfg(curated, tmp_path, teachers=("test-colour", "test-colour"))
    with pytest.raises(ValueError, match=">= 0"):
        _cfg(curated, tmp_path, weight_temperature=-1.0)
    with pytest.raises(KeyError, match="cka, parc, rsa"):
        _cfg(curated, tmp_path, similarity="pearson")
    cfg = _cfg(curated, tmp_path, weight_temperature=float("inf"))
    assert from_mapping(DistillConfig, json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_rank_cli_draws_the_probe_set_from_the_named_query_set(curated, tmp_path, monkeypatch, capsys):
    import curation.querysets as querysets
    from curation.querysets import LabeledImage, QuerySet
    from fixtures_curated import synthetic_image

    shots = [LabeledImage(f"q{c}-{i}", c, lambda c=c, i=i: synthetic_image(c, 1000 + i, 24)) for c in range(3)
             for i in range(4)]
    qs = QuerySet(name="synthetic", classes=["a", "b", "c"], seed=0, shots=4, queries=shots, references=[], test=[])
    monkeypatch.setattr(querysets, "get_query_set", lambda name, data_root=None, seed=0: qs)
    assert main(["rank", "--queries", "synthetic", "--teachers", "test-noise,test-colour",
                 "--out", str(tmp_path / "r")]) == 0
    saved = json.loads((tmp_path / "r" / "ranking.json").read_text())
    assert [r["name"] for r in saved["ranking"]] == ["test-colour", "test-noise"]
    assert saved["probe_set"]["count"] == 12 and (tmp_path / "r" / "cache").is_dir()


def test_baseline_of_a_source_head_run_is_labels_only(curated, tmp_path):
    m = run_distill(_cfg(curated, tmp_path / "b", teachers=("test-tiny-timm",), teacher_head="source", baseline=True),
                    query_set=curated[1])
    assert isinstance(m["baseline_accuracy"], float)
