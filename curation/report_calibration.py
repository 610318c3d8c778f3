"""The calibration section of the curation report: the curves `curation.calibrate` measured, as plots.

For each signal (embedding similarity, pixel key similarity, verification score, verification
residual) one plot: the fraction of each kind of synthetic copy that passes a limit, as the limit
moves, against the same fraction for each sampled image's nearest distinct image (the look-alikes a
threshold must not pass, drawn dashed red); the chosen threshold is a vertical line. A copy kind
whose line falls before the threshold is a kind the threshold would miss; the look-alikes' line at
the threshold is the false-positive rate of that signal alone. Then the recall each kind reached.
"""
from __future__ import annotations

from typing import Any

from curation import plots
from curation.htmlpage import escape
from curation.thresholds import limit_text

DISTINCT = "nearest distinct image"


def _plot(x, copies: dict[str, list[float]], distinct: list[float], *, title: str, xlabel: str, ylabel: str,
          lines: dict[str, float | None]) -> str:
    series = {f"copy: {k}": v for k, v in copies.items()}
    series[DISTINCT] = distinct
    return plots.line_plot(x, series, title=title, xlabel=xlabel, ylabel=ylabel, emphasis=(DISTINCT,),
                           vlines={k: v for k, v in lines.items() if v is not None}, ylim=(-0.02, 1.02),
                           width=5.2, height=3.4)


def _verification(cal: dict[str, Any]) -> str:
    """What confirms a candidate; a limit that is off says "off", never a number it does not have."""
    if cal.get("verify_threshold") is None:
        return f'verification <b>off</b> (verifier {escape(cal["verify"])})'
    residual = cal.get("verify_max_residual")
    pixel = cal.get("pixel_threshold")
    return (f'verifier {escape(cal["verify"])} with score above <b>{limit_text(cal["verify_threshold"])}</b> and '
            + ("residual limit <b>off</b>" if residual is None
               else f"residual at most <b>{limit_text(residual)}</b> grey levels")
            + f', {cal["neighbours"]} nearest references verified (by embedding'
            + ("; candidates by pixel key <b>off</b>)" if pixel is None
               else f", and by pixel key above <b>{limit_text(pixel)}</b>)"))


def calibration_section(cal: dict[str, Any] | None) -> str:
    if not cal:
        return "<p>No calibration ran: every threshold was given.</p>"
    head = (f'<p>{cal["num_images"]} images of the target sampled, one synthetic copy of each per kind; '
            f'target recall {cal["recall_target"]} for every kind. Chosen: leak threshold '
            f'<b>{limit_text(cal["leak_threshold"])}</b>, dedup threshold <b>{limit_text(cal["dedup_threshold"])}</b>, '
            f'{_verification(cal)}. Estimated false-positive rate on each image\'s '
            f'nearest distinct image: {cal["false_positive_rate"]:.3f}.</p>')
    kinds = list(cal["recall"])
    recall = plots.bar_plot(kinds, {"recall (the chosen decision)": [cal["recall"][k] for k in kinds],
                                    "source among the verified references":
                                        [cal["source_in_neighbours"].get(k, 0.0) for k in kinds]},
                            title="Recall per copy kind", ylabel="fraction of copies", ylim=(0, 1.12))
    cv = cal.get("curves") or {}
    figs = []
    if cv:
        grid = cv["grid"]
        figs.append(_plot(grid, cv["copies_similarity"], cv["distinct_similarity"],
                          title="Embedding similarity to the source", xlabel="threshold (max cosine over encoders)",
                          ylabel="fraction above", lines={"leak": cal["leak_threshold"],
                                                          "dedup (on mean cosine)": cal["dedup_threshold"]}))
        if "copies_pixel" in cv:
            figs.append(_plot(grid, cv["copies_pixel"], cv["distinct_pixel"], title="Pixel key similarity",
                              xlabel="threshold (pixel key similarity)", ylabel="fraction above",
                              lines={"key": cal.get("pixel_threshold")}))
        figs.append(_plot(grid, cv["copies_verify"], cv["distinct_verify"], title="Verification score",
                          xlabel="threshold (aligned correlation)", ylabel="fraction above",
                          lines={"verify": cal["verify_threshold"]}))
        if "residual_grid" in cv:
            figs.append(_plot(cv["residual_grid"], cv["copies_residual"], cv["distinct_residual"],
                              title="Verification residual", xlabel="limit (grey levels)",
                              ylabel="fraction at or below", lines={"max residual": cal.get("verify_max_residual")}))
    return head + f'<div class="plots">{"".join(figs)}{recall}</div>'
