"""A distillation run's ``report.html``: how the student learned and where it errs, as plots.

    write_run_report(out_dir, metrics) -> OUT/report.html

Made from ``metrics.json`` alone (the trainer records each step's loss and each epoch's mean
losses and accuracy; the evaluation the per-class accuracy and the confusion matrix), so it can be
rewritten for any finished run. Sections (stable ids), each linked from the table of contents:

- ``curves``: the loss of every step and the accuracy of every epoch, per phase (accuracy on the
  training batches: the labels in the finetune phase, agreement with the teacher's top class on
  the transfer set for KD); the test accuracy at the end;
- ``per-class``: the student's test accuracy per class beside the teacher's (and the labels-only
  baseline's overall accuracy as a line);
- ``confusion``: the student's confusion matrix on the test split;
- ``aft-weights``: AFT's learned feature weights sigmoid(s) per pretrained model (AFT runs only);
- ``numbers``: the accuracies, the run's settings and where the time went.

Plots are inline SVG (`curation.plots`); the page has no script and no external resource.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from curation import plots
from curation.htmlpage import escape, page, table
from index.core.atomic import atomic_path

REPORT_FILE = "report.html"
SMOOTH = 25   # steps in the moving average drawn over the per-step loss


def _moving_average(x: list[float], k: int) -> list[float]:
    if len(x) < 2 * k:
        return []
    c = np.cumsum(np.r_[0.0, x])
    return ((c[k:] - c[:-k]) / k).tolist()


def _curves(metrics: dict[str, Any]) -> str:
    phases = metrics.get("training", {}).get("phases", [])
    figs = []
    for ph in phases:
        loss = ph.get("step_loss") or []
        if loss:
            steps = list(range(1, len(loss) + 1))
            series, xs = {"loss of each step": loss}, {}
            avg = _moving_average(loss, SMOOTH)
            if avg:
                series[f"mean of {SMOOTH} steps"] = avg
                xs[f"mean of {SMOOTH} steps"] = steps[SMOOTH - 1:]
            figs.append(plots.line_plot(steps, series, xs=xs, title=f"{ph['name']} phase: loss per step",
                                        xlabel="step", ylabel="loss"))
        epochs = ph.get("epochs") or []
        acc = {name: [e[key] for e in epochs] for key, name in (
            ("accuracy", "accuracy on the labelled batches"),
            ("teacher_agreement", "agreement with the teacher's top class")) if epochs and key in epochs[0]}
        if acc:
            x = [e["epoch"] + 1 for e in epochs]
            marks = {}
            if ph is phases[-1] and metrics.get("test_accuracy") is not None:
                marks["test accuracy"] = (x[-1], metrics["test_accuracy"])
            title = f"{ph['name']}: {next(iter(acc))}" if len(acc) == 1 else f"{ph['name']}: accuracy per epoch"
            figs.append(plots.line_plot(x, acc, title=title, xlabel="epoch",
                                        ylabel="fraction of the training batches", ylim=(-0.02, 1.02), marks=marks))
    if not figs:
        return "<p>No training recorded.</p>"
    reused = [ph["name"] for ph in phases if ph.get("reused") and not ph.get("step_loss")]
    note = (f'<p class="note">Phases {", ".join(reused)} were finished by an earlier version without per-step '
            "losses.</p>") if reused else ""
    return (note + '<p class="small">Training accuracy is measured on the augmented training batches as they '
            "were trained on; the test accuracy (a point) on the held-out test split at the end.</p>"
            f'<div class="plots">{"".join(figs)}</div>')


def _teacher_per_class(metrics: dict[str, Any]) -> dict[str, float | None] | None:
    if metrics.get("teacher_per_class_accuracy"):
        return metrics["teacher_per_class_accuracy"]
    for t in metrics.get("teachers") or []:
        if t.get("per_class_accuracy"):
            return t["per_class_accuracy"]
    return None


def _per_class(metrics: dict[str, Any]) -> str:
    student = metrics.get("per_class_accuracy") or {}
    if not student:
        return "<p>No evaluation recorded.</p>"
    classes = list(student)
    groups = {f"student ({metrics['student']})": [student[c] for c in classes]}
    teacher = _teacher_per_class(metrics)
    if teacher:
        groups[f"teacher ({metrics.get('teacher')})"] = [teacher.get(c) for c in classes]
    fig = plots.bar_figure(classes, groups, title="Test accuracy per class", ylabel="accuracy", ylim=(0, 1.1),
                           emphasis=[k for k in groups if k.startswith("teacher")])
    base = metrics.get("baseline_accuracy")
    if base is not None and metrics.get("method") != "labels_only":
        fig.axes[0].axhline(base, color="#222", lw=1, ls=":", label=f"labels-only baseline {base:.3f}")
        fig.axes[0].legend(fontsize=7, loc="best", framealpha=0.85)
    return plots.figure_img(fig, "Test accuracy per class")


def _confusion(metrics: dict[str, Any]) -> str:
    m = metrics.get("confusion")
    if not m:
        return "<p>No confusion matrix recorded.</p>"
    classes = metrics.get("classes") or list(metrics.get("per_class_accuracy") or range(len(m)))
    return ('<p class="small">Rows: the true class; columns: the student\'s prediction; counts, shaded by the '
            "fraction of the row.</p>"
            + plots.matrix_plot(m, [str(c) for c in classes], title="Confusion matrix (test split)",
                                xlabel="predicted", ylabel="true"))


def _aft(metrics: dict[str, Any]) -> str:
    blocks = metrics["training"]["aft_mu"]["per_source"]
    names = [b["name"] for b in blocks]
    fig = plots.bar_plot(names, {"mean": [b["mean"] for b in blocks]}, title="AFT: learned feature weights per model",
                         ylabel="sigmoid(s)", ylim=(0, 1.05),
                         errors={"mean": ([b["min"] for b in blocks], [b["max"] for b in blocks])})
    return ('<p class="small">sigmoid(s) over each pretrained model\'s feature block: the mean (bar) and its '
            "range (whiskers). Every weight starts at 0.5.</p>" + fig)


def _numbers(metrics: dict[str, Any]) -> str:
    rows = [("method", metrics.get("method")), ("student", metrics.get("student")),
            ("teacher", metrics.get("teacher")), ("test accuracy", metrics.get("test_accuracy")),
            ("teacher accuracy", metrics.get("teacher_accuracy")),
            ("labels-only baseline accuracy", metrics.get("baseline_accuracy")),
            ("test images", metrics.get("num_test"))]
    cfg = metrics.get("config") or {}
    rows += [(k.replace("_", " "), cfg.get(k)) for k in ("transfer", "resolution", "batch_size", "lr",
                                                        "transfer_epochs", "finetune_epochs", "seed")]
    timing = sorted((metrics.get("timings") or {}).items(), key=lambda kv: -kv[1])
    trows = "".join(f'<tr><td>{escape(k)}</td><td class="n">{v:.1f} s</td></tr>' for k, v in timing)
    return (table(rows) + (f'<h3>Time</h3><table class="nums">{trows}</table>' if trows else "")
            + (f'<p class="small">total {metrics["seconds"]:.1f} s</p>' if metrics.get("seconds") else ""))


def render_run_report(metrics: dict[str, Any]) -> str:
    sections = [("curves", "Learning curves", _curves(metrics)),
                ("per-class", "Accuracy per class", _per_class(metrics)),
                ("confusion", "Confusion matrix", _confusion(metrics))]
    if (metrics.get("training", {}).get("aft_mu") or {}).get("per_source"):
        sections.append(("aft-weights", "AFT feature weights", _aft(metrics)))
    sections.append(("numbers", "Numbers", _numbers(metrics)))

    def pct(v: Any) -> str:
        return f"{100 * v:.2f}%" if isinstance(v, float) else "n/a"
    sub = (f"test accuracy {pct(metrics.get('test_accuracy'))}; teacher {pct(metrics.get('teacher_accuracy'))}; "
           f"labels-only baseline {pct(metrics.get('baseline_accuracy'))}")
    return page(f"Distillation run: {metrics.get('method')}, student {metrics.get('student')}", sections, subtitle=sub)


def write_run_report(out_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write OUT/report.html from a finished run's metrics (atomically)."""
    path = Path(out_dir) / REPORT_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(render_run_report(metrics), encoding="utf-8")
    return path
