"""Small figures written next to a run's metrics (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from index.atomic import atomic_path


def bar_plot(path: str | Path, labels: Sequence[str], values: Sequence[float], *, title: str = "",
             ylabel: str = "") -> Path:
    """One bar per label, its value printed on top; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(labels) + 1.5), 3.2))
    bars = ax.bar(range(len(labels)), values, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, max(1.0, max(values, default=0) * 1.15))
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


RANKING_PLOT = "ranking.svg"


def ranking_plot(out_dir: str | Path, result: dict) -> Path:
    """`distill rank`'s table as a plot: each teacher's similarities (and probe accuracy), best first."""
    from curation.plots import bar_figure, figure_svg

    ranking = result["ranking"]
    names = [f"{r['rank']}. {r['name']}" for r in ranking]
    metrics = list(ranking[0]["similarity"]) if ranking else []
    groups = {m + (" (sort key)" if m == result["metric"] else ""): [r["similarity"][m] for r in ranking]
              for m in metrics}
    if "by_probe_accuracy" in result:
        groups["probe accuracy (cross-validated)"] = [r.get("probe_accuracy") for r in ranking]
    low = min([0.0] + [v for vals in groups.values() for v in vals if v is not None])
    fig = bar_figure(names, groups, title=f"Teachers ranked by {result['metric']} on the probe set "
                                          f"({result['probe_set']['count']} labelled images)",
                     ylabel="score", ylim=(min(0.0, low * 1.1), 1.1))
    path = Path(out_dir) / RANKING_PLOT
    with atomic_path(path) as tmp:
        tmp.write_bytes(figure_svg(fig, "ranking"))
    return path
