"""Plots for the HTML reports: matplotlib figures embedded as SVG ``<img>`` data URIs.

An SVG in an ``<img>`` keeps the page self-contained, scales without blur, cannot clash with the
page's ids or CSS, and reports a natural size like any image. Text stays text (``svg.fonttype``
none) and the bytes are deterministic (no date, a fixed id salt per figure), so a rerun writes the
same report.

    line_plot(series, ...)       lines over a shared x axis, with marked thresholds
    bar_plot(groups, ...)        grouped bars (one colour per series), values on top
    matrix_plot(matrix, ...)     a heatmap with the counts written in its cells
    figure_img(fig, alt)         any matplotlib figure as an <img> tag
    figure_svg(fig, salt)        ... or as SVG bytes, for a file

Each ``*_plot`` returns the ``<img>`` tag (a str), and its ``*_figure`` twin the figure, for
`figure_svg`; matplotlib is imported only when a plot is made.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any, Sequence

import numpy as np

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
           "#64b5cd", "#2f4b7c")
EMPHASIS = "#c44e52"   # the series a reader compares the others with (look-alikes, the teacher)


def _plt():
    import matplotlib  # lazy: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib

    return plt


def figure(width: float = 5.0, height: float = 3.2):
    """A new (figure, axes) at this size in inches."""
    return _plt().subplots(figsize=(width, height))


def figure_svg(fig, salt: str) -> bytes:
    """The figure as SVG bytes, deterministic for a given ``salt`` (the figure is closed)."""
    import matplotlib  # lazy: matplotlib

    plt = _plt()
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.tight_layout()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    return buf.getvalue()


def figure_img(fig, alt: str) -> str:
    """The figure as ``<img src="data:image/svg+xml;base64,...">`` (the figure is closed)."""
    uri = "data:image/svg+xml;base64," + base64.b64encode(figure_svg(fig, alt)).decode("ascii")
    return f'<img class="plot" src="{uri}" alt="{html.escape(alt, quote=True)}">'


def line_plot(*args, **kwargs) -> str:
    """`line_figure` as an <img> tag."""
    return figure_img(line_figure(*args, **kwargs), kwargs["title"])


def bar_plot(*args, **kwargs) -> str:
    """`bar_figure` as an <img> tag."""
    return figure_img(bar_figure(*args, **kwargs), kwargs["title"])


def matrix_plot(*args, **kwargs) -> str:
    """`matrix_figure` as an <img> tag."""
    return figure_img(matrix_figure(*args, **kwargs), kwargs["title"])


def line_figure(x: Sequence[float], series: dict[str, Sequence[float]], *, title: str, xlabel: str, ylabel: str,
              emphasis: Sequence[str] = (), vlines: dict[str, float] | None = None, marks: dict[str, tuple] | None = None,
              width: float = 5.0, height: float = 3.2, ylim: tuple[float, float] | None = None,
              xs: dict[str, Sequence[float]] | None = None):
    """One line per series over ``x`` (or its own x in ``xs``); ``emphasis`` series are drawn
    thick and red-dashed; ``vlines``: {label: x} vertical lines (chosen thresholds); ``marks``:
    {label: (x, y)} single points."""
    fig, ax = figure(width, height)
    colours = iter(PALETTE * 4)
    for name, ys in series.items():
        sx = (xs or {}).get(name, x)
        if name in emphasis:
            ax.plot(sx, ys, color=EMPHASIS, lw=2.4, ls="--", label=name)
        else:
            ax.plot(sx, ys, color=next(colours), lw=1.3, label=name)
    for i, (name, v) in enumerate((vlines or {}).items()):
        ax.axvline(v, color="#222", lw=1.1, ls=(0, (4, 2 + 2 * i)), label=f"{name} = {v:.4g}")
    for name, (mx, my) in (marks or {}).items():
        ax.plot([mx], [my], "o", color="#222", ms=6, label=f"{name} {my:.4g}")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    if len(series) + len(vlines or {}) + len(marks or {}) > 1:
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
    return fig


def bar_figure(labels: Sequence[str], groups: dict[str, Sequence[float | None]], *, title: str, ylabel: str,
             ylim: tuple[float, float] | None = None, emphasis: Sequence[str] = (), values: bool = True,
             errors: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None, height: float = 3.2):
    """Bars per label, one colour per group (None: no bar); ``errors``: {group: (low, high)} whiskers."""
    fig, ax = figure(max(4.5, 0.45 * len(labels) * max(1, len(groups)) + 2.0), height)
    n = max(1, len(groups))
    w = 0.8 / n
    colours = iter(PALETTE * 4)
    for gi, (name, vals) in enumerate(groups.items()):
        pos = np.arange(len(labels)) + (gi - (n - 1) / 2) * w
        v = np.array([np.nan if x is None else x for x in vals], float)
        colour = EMPHASIS if name in emphasis else next(colours)
        yerr = None
        if errors and name in errors:
            lo, hi = (np.asarray(e, float) for e in errors[name])
            yerr = np.vstack([v - lo, hi - v])
        bars = ax.bar(pos, np.nan_to_num(v), w * 0.95, color=colour, label=name, yerr=yerr, capsize=3)
        if values:
            for b, x in zip(bars, v):
                if np.isfinite(x):
                    ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{x:.2f}", ha="center", va="bottom",
                            fontsize=6)
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4
                  else "center", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
    return fig


def matrix_figure(matrix: Sequence[Sequence[float]], labels: Sequence[str], *, title: str, xlabel: str, ylabel: str,
                  normalise_rows: bool = True):
    """A square matrix as a heatmap (rows normalised to fractions for the colour), counts in the cells."""
    m = np.asarray(matrix, float)
    shade = m / np.maximum(m.sum(axis=1, keepdims=True), 1) if normalise_rows else m
    side = max(4.0, 0.42 * len(labels) + 2.2)
    fig, ax = figure(side + 0.8, side)
    im = ax.imshow(shade, cmap="Blues", vmin=0, vmax=1 if normalise_rows else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row" if normalise_rows else None)
    for (i, j), v in np.ndenumerate(m):
        if v:
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if shade[i, j] > 0.5 else "#222")
    ticks: dict[str, Any] = {"fontsize": 7}
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", **ticks)
    ax.set_yticks(range(len(labels)), labels, **ticks)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig
