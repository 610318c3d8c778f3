"""A distillation run's report.html: learning curves from the recorded step losses and epoch
accuracies, per-class accuracy against the teacher's, the confusion matrix, AFT's weights; it reads
well in headless Chromium. `distill rank` writes its table as a plot."""
from __future__ import annotations

import json
import re

import pytest

from distill.config import DistillConfig
from distill.plots import ranking_plot
from distill.report import render_run_report
from distill.run import run_distill, summary_line

from browser import assert_readable_report, inspect_page
from fixtures_curated import write_curated_dir


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_per_module):
    """One torch thread for the whole module, the `runs` fixture included (a module fixture is set up before a
    function one such as conftest.one_torch_thread): the same float math on every machine, and no second
    intra-op thread waiting at barriers on a busy 2-core one."""


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    d = tmp_path_factory.mktemp("curated")
    qs = write_curated_dir(d, num_classes=3, shots=4, transfer=24, test_per_class=4, size=24, shard_size=10)
    return d, qs


@pytest.fixture(scope="module")
def runs(curated, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("kd", "aft"):
        cfg = DistillConfig(method=method, transfer=str(curated[0]), queries="synthetic", out=str(root / method),
                            teacher="test-tiny-timm", student="test-tiny-student", resolution=16, batch_size=8,
                            transfer_epochs=2, finetune_epochs=3, probe_steps=30, progress=False, eval_batch_size=16,
                            baseline=method == "kd")
        out[method] = (root / method, run_distill(cfg, query_set=curated[1]))
    return out


def _sections(text: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)">', text)


def test_metrics_hold_what_the_curves_and_the_matrix_are_drawn_from(runs):
    _, m = runs["kd"]
    transfer, finetune = m["training"]["phases"]
    assert len(transfer["step_loss"]) == transfer["steps"] == 6 and len(finetune["step_loss"]) == finetune["steps"]
    assert all(x > 0 for x in transfer["step_loss"] + finetune["step_loss"])
    # each epoch's mean loss is the mean of its steps' losses
    per_epoch = transfer["epochs"][0]["steps"]
    assert transfer["epochs"][0]["loss"] == pytest.approx(sum(transfer["step_loss"][:per_epoch]) / per_epoch, rel=1e-4)
    assert all(0.0 <= e["teacher_agreement"] <= 1.0 for e in transfer["epochs"])
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in finetune["epochs"]) and len(finetune["epochs"]) == 3
    conf = m["confusion"]
    assert len(conf) == 3 and sum(map(sum, conf)) == m["num_test"] == 12
    for i, c in enumerate(m["classes"]):
        assert m["per_class_accuracy"][c] == pytest.approx(conf[i][i] / sum(conf[i]))
    assert set(m["timings"]) >= {"teacher", "training", "evaluation"} and "most time: " in summary_line(m)


def test_report_sections_and_plots(runs):
    out, m = runs["kd"]
    text = (out / "report.html").read_text()
    assert _sections(text) == ["curves", "per-class", "confusion", "numbers"]     # no AFT section for kd
    assert all(f'href="#{s}"' in text for s in _sections(text))
    # 2 phases x (loss per step, accuracy per epoch) + per class + confusion
    assert text.count('<img class="plot"') == 6
    assert "transfer phase: loss per step" in text and "finetune: accuracy on the labelled batches" in text
    assert "transfer: agreement with the teacher&#x27;s top class" in text
    assert "Test accuracy per class" in text and "Confusion matrix (test split)" in text
    assert "<script" not in text.lower() and "http" not in text.split("<body>", 1)[1].split('src="data:')[0]
    aft_out, aft = runs["aft"]
    aft_text = (aft_out / "report.html").read_text()
    assert "aft-weights" in _sections(aft_text) and "AFT: learned feature weights per model" in aft_text
    # rendering is a pure function of the metrics: the same bytes again
    assert render_run_report(json.loads((out / "metrics.json").read_text())) == text


@pytest.mark.slow
def test_run_report_reads_well_in_headless_chromium(runs, tmp_path):
    for method, (out, _) in runs.items():
        check = inspect_page(out / "report.html", tmp_path / f"{method}.png")
        assert_readable_report(check, min_first_screen=2)
        assert check.images >= 6


def test_ranking_plot_is_an_svg_of_every_teacher(tmp_path):
    result = {"metric": "parc", "probe_set": {"count": 40}, "by_probe_accuracy": ["b", "a"],
              "ranking": [{"rank": 1, "name": "a", "similarity": {"parc": 0.3, "cka": 0.7, "rsa": -0.1},
                           "probe_accuracy": 0.6},
                          {"rank": 2, "name": "b", "similarity": {"parc": 0.2, "cka": 0.8, "rsa": 0.2},
                           "probe_accuracy": 0.7}]}
    svg = ranking_plot(tmp_path, result).read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for text in ("1. a", "2. b", "parc (sort key)", "probe accuracy (cross-validated)", "0.70"):
        assert text in svg
    assert ranking_plot(tmp_path, result).read_text() == svg    # deterministic bytes
