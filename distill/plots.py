"""Small figures written next to a run's metrics, as files (`curation.plots` draws them).

    bar_plot(path, labels, values)   a PNG bar chart (AFT's weights per model: aft_source_weights.png)
    ranking_plot(out_dir, result)    `distill rank`'s table as ranking.svg
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from curation.plots import bar_figure, figure_svg
from index.core.atomic import atomic_path


def bar_plot(path: str | Path, labels: Sequence[str], values: Sequence[float], *, title: str = "",
             ylabel: str = "") -> Path:
    """One bar per label, its value printed on top; written atomically as PNG."""
    fig = bar_figure(labels, {ylabel: values}, title=title, ylabel=ylabel, ylim=(0, max(1.0, max(values, default=0) * 1.15)))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=100)
    import matplotlib.pyplot as plt  # lazy: matplotlib

    plt.close(fig)
    return path


RANKING_PLOT = "ranking.svg"


def ranking_plot(out_dir: str | Path, result: dict) -> Path:
    """`distill rank`'s table as a plot: each teacher's similarities (and probe accuracy), best first."""
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
