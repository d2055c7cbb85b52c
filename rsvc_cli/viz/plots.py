"""Plots for the report: the per-class concept figure, similarity vs importance, layer x layer heatmaps.

The per-class figure (each model's concepts at their importance and similarity, the paper's figure),
drawn for every class of every comparison, is a hand-made SVG (``write_class_concepts_svg``): about a
millisecond each instead of a quarter second through matplotlib, sharp at any zoom, and any browser
opens it offline. It replaced a bar chart that put model 1's concept k and model 2's concept k under one
tick, though the two are unrelated.

Figures are built on matplotlib's object API with the Agg canvas, never ``pyplot``: no global
figure state, no GUI backend, safe in worker processes. Each ``plot_*`` writes a PNG and returns its
path; each ``make_*_figure`` returns the figure so tests can inspect what was drawn.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
_POINT_COLOUR = "#1f77b4"


def _plain(text) -> str:
    """Text as matplotlib should print it: a '$' pair would otherwise start math mode."""
    return str(text).replace("$", r"\$")


def _save(figure: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI, format="png")
    return path


_SVG_FONT = "DejaVu Sans, Arial, sans-serif"
# Average glyph width of that font, in font sizes: enough to shorten a label before it overflows,
# with no text measurement.
_SVG_CHAR_WIDTH = 0.6
_SVG_OUTLINE = "#333333"


def _xml(text) -> str:
    return html.escape(str(text), quote=True)


def _fit(text, width: float, font_size: float) -> str:
    """``text``, cut with an ellipsis if its estimated width exceeds ``width`` pixels."""
    text = str(text)
    limit = max(1, int(width / (_SVG_CHAR_WIDTH * font_size)))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _px(value: float) -> str:
    # Five decimals keep positions exact far below a pixel, so values can be read back from them.
    return f"{value:.5f}".rstrip("0").rstrip(".")


def make_similarity_vs_importance_figure(
    title: str,
    similarity: Sequence[float],
    importance: Sequence[float],
    labels: Sequence[str] | None = None,
) -> Figure:
    """Scatter of each concept's importance (x) against its similarity (y), points labelled.

    Concepts with an undefined similarity or importance are left out and counted in a note.
    """
    similarity = np.asarray(similarity, dtype=np.float64).reshape(-1)
    importance = np.asarray(importance, dtype=np.float64).reshape(-1)
    if similarity.shape != importance.shape:
        raise ValueError(f"similarity {similarity.shape} and importance {importance.shape} differ in length")
    if labels is None:
        labels = [str(i) for i in range(similarity.size)]
    finite = np.isfinite(similarity) & np.isfinite(importance)

    figure = Figure(figsize=(4.6, 3.8))
    axes = figure.add_subplot()
    axes.scatter(importance[finite], similarity[finite], s=28, color="#1f77b4", zorder=3)
    for x, y, label in zip(importance[finite], similarity[finite], np.asarray(labels, dtype=object)[finite]):
        axes.annotate(_plain(label), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7)
    if (~finite).any():
        axes.text(
            0.01, 0.01, f"{int((~finite).sum())} undefined, not shown", transform=axes.transAxes, fontsize=7,
            color="#555555",
        )
    axes.margins(0.12)  # room for the labels of the outermost points
    axes.set_xlabel("importance (normalized)")
    axes.set_ylabel("similarity (Pearson r)")
    axes.set_title(_plain(title), fontsize=10)
    axes.grid(color="#dddddd", linewidth=0.5)
    axes.set_axisbelow(True)
    figure.tight_layout()
    return figure


def plot_similarity_vs_importance(
    path,
    title: str,
    similarity: Sequence[float],
    importance: Sequence[float],
    labels: Sequence[str] | None = None,
) -> Path:
    """Write the similarity-vs-importance scatter (see ``make_similarity_vs_importance_figure``)."""
    return _save(make_similarity_vs_importance_figure(title, similarity, importance, labels), path)


def make_layer_heatmap_figure(
    title: str,
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    colorbar_label: str = "mean max correlation",
    value_format: str = "{:.2f}",
    row_title: str | None = None,
    col_title: str | None = None,
) -> Figure:
    """Layer x layer heatmap, each cell annotated with its value; NaN cells stay blank and unlabelled."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape != (len(row_labels), len(col_labels)):
        raise ValueError(
            f"matrix of shape {matrix.shape} does not match {len(row_labels)} row and {len(col_labels)} column labels"
        )
    n_rows, n_columns = matrix.shape
    figure = Figure(figsize=(max(3.8, 0.62 * n_columns + 2.4), max(3.0, 0.48 * n_rows + 1.6)))
    axes = figure.add_subplot()
    masked = np.ma.masked_invalid(matrix)
    finite = matrix[np.isfinite(matrix)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high == low:
        low, high = low - 0.5, high + 0.5
    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = axes.imshow(masked, cmap=colormap, vmin=low, vmax=high, aspect="auto")
    rows, columns = np.nonzero(np.isfinite(matrix))
    for row, column in zip(rows, columns):
        value = matrix[row, column]
        # Dark text on the bright (yellow) end of viridis, light text on the dark end.
        colour = "black" if (value - low) / (high - low) > 0.6 else "white"
        axes.text(column, row, value_format.format(value), ha="center", va="center", fontsize=7, color=colour)
    axes.set_xticks(np.arange(n_columns), [_plain(label) for label in col_labels], rotation=45, ha="right")
    axes.set_yticks(np.arange(n_rows), [_plain(label) for label in row_labels])
    if row_title:
        axes.set_ylabel(_plain(row_title))
    if col_title:
        axes.set_xlabel(_plain(col_title))
    axes.set_title(_plain(title), fontsize=10)
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label(_plain(colorbar_label))
    figure.tight_layout()
    return figure


def plot_layer_heatmap(
    path,
    title: str,
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    colorbar_label: str = "mean max correlation",
    row_title: str | None = None,
    col_title: str | None = None,
) -> Path:
    """Write the annotated layer x layer heatmap (see ``make_layer_heatmap_figure``).

    ``row_title``/``col_title`` name the axes, e.g. "model1 layer" and "model2 layer".
    """
    figure = make_layer_heatmap_figure(
        title, matrix, row_labels, col_labels, colorbar_label, row_title=row_title, col_title=col_title
    )
    return _save(figure, path)


# The per-class concept figure (the paper's: similarity against importance), one panel per model.
_PANEL_WIDTH, _PANEL_HEIGHT = 430, 380
# The legend sits under the x label, never over points (self baselines crowd the top of the plot).
_PANEL_LEFT, _PANEL_RIGHT, _PANEL_TOP, _PANEL_BOTTOM = 58, 16, 26, 96
_MARKED_COLOUR = "#c2410c"


def _padded_range(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """[low, high] widened to hold every finite value, with 5% headroom on both sides."""
    finite = values[np.isfinite(values)]
    if finite.size:
        low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    pad = 0.05 * (high - low or 1.0)
    return low - pad, high + pad


def _ticks(low: float, high: float) -> list[float]:
    span = high - low
    step = 0.1 if span <= 0.8 else 0.2 if span <= 1.6 else 0.5
    return [round(i * step, 10) for i in range(math.ceil(low / step), math.floor(high / step) + 1)]


def class_concepts_svg(title: str, panels: Sequence[Mapping], n_marked: int = 3) -> str:
    """One scatter panel per model: each of its concepts at (importance, similarity), its self
    baseline as a hollow ring above or below it on a thin line (the gap), the ``n_marked`` lowest
    similarities (the most model-specific concepts) in orange and labelled in bold.

    A panel is {"name": the owning model, "predictor": the other model, "direction": "2->1",
    "similarity": [...], "self_similarity": [...], "importance": [...] or None}. Without importance the
    x axis is the self baseline instead (and the panel says so), so a point under the diagonal is a
    concept the other model predicts worse than its owner does. No two models' concepts ever share an
    axis position: concept k of one model has nothing to do with concept k of the other. Points carry
    ``data-owner``, ``data-concept``, ``data-x`` and ``data-y``; undefined points are counted in a note.
    """
    width = _PANEL_WIDTH * max(len(panels), 1)
    height = _PANEL_HEIGHT + 34
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'font-family="{_SVG_FONT}" font-size="12" fill="#222222">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text class="title" x="{width / 2}" y="20" text-anchor="middle" font-size="15">{_xml(_fit(title, width, 15))}</text>',
    ]
    for position, panel in enumerate(panels):
        parts.append(_concept_panel(panel, x0=position * _PANEL_WIDTH, y0=34, n_marked=n_marked))
    parts.append("</svg>\n")
    return "\n".join(parts)


def _concept_panel(panel: Mapping, x0: float, y0: float, n_marked: int) -> str:
    similarity = np.asarray(panel["similarity"], dtype=np.float64).reshape(-1)
    baseline = np.asarray(panel["self_similarity"], dtype=np.float64).reshape(-1)
    importance = panel.get("importance")
    by_importance = importance is not None
    x_values = np.asarray(importance if by_importance else baseline, dtype=np.float64).reshape(-1)
    left, top = x0 + _PANEL_LEFT, y0 + _PANEL_TOP
    plot_width = _PANEL_WIDTH - _PANEL_LEFT - _PANEL_RIGHT
    plot_height = _PANEL_HEIGHT - _PANEL_TOP - _PANEL_BOTTOM
    x_low, x_high = _padded_range(x_values, -1.0 if by_importance and np.nanmin(x_values, initial=0) < 0 else 0.0, 1.0)
    # From the lowest value (not from 0) up to 1: similarities of trained models crowd 0.5-1.
    y_low, y_high = _padded_range(np.concatenate([similarity, baseline]), 1.0, 1.0)

    def sx(value):
        return left + (value - x_low) / (x_high - x_low) * plot_width

    def sy(value):
        return top + (y_high - value) / (y_high - y_low) * plot_height

    name, predictor, direction = str(panel["name"]), str(panel["predictor"]), str(panel["direction"])
    parts = [f'<g class="panel" data-owner="{_xml(name)}">',
             f'<text class="panel-title" x="{_px(left + plot_width / 2)}" y="{y0 + 12}" text-anchor="middle" '
             f'font-size="13" font-weight="bold">{_xml(_fit(name + "’s concepts", plot_width + 40, 13))}</text>']
    for tick in _ticks(y_low, y_high):
        y = _px(sy(tick))
        parts.append(f'<line class="grid" x1="{left}" x2="{left + plot_width}" y1="{y}" y2="{y}" stroke="#e4e4e4"/>'
                     f'<text x="{left - 6}" y="{y}" text-anchor="end" dominant-baseline="central" font-size="11">'
                     f'{f"{tick:.1f}".replace("-", "−")}</text>')
    for tick in _ticks(x_low, x_high):
        x = _px(sx(tick))
        parts.append(f'<line class="grid" x1="{x}" x2="{x}" y1="{top}" y2="{top + plot_height}" stroke="#e4e4e4"/>'
                     f'<text x="{x}" y="{top + plot_height + 15}" text-anchor="middle" font-size="11">'
                     f'{f"{tick:.1f}".replace("-", "−")}</text>')
    if not by_importance:  # the diagonal: predicted as well by the other model as by the owner
        low, high = max(x_low, y_low), min(x_high, y_high)
        parts.append(f'<line class="diagonal" x1="{_px(sx(low))}" y1="{_px(sy(low))}" x2="{_px(sx(high))}" '
                     f'y2="{_px(sy(high))}" stroke="#999999" stroke-dasharray="4 3"/>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_width}" height="{plot_height}" fill="none" stroke="{_SVG_OUTLINE}"/>')

    defined = np.isfinite(similarity) & np.isfinite(x_values)
    order = [k for k in np.argsort(np.where(defined, similarity, np.inf), kind="stable") if defined[k]]
    marked = set(int(k) for k in order[:n_marked])
    for k in np.nonzero(defined)[0]:
        k = int(k)
        x, y = sx(x_values[k]), sy(similarity[k])
        colour = _MARKED_COLOUR if k in marked else _POINT_COLOUR
        weight = ' font-weight="bold"' if k in marked else ""
        if by_importance and np.isfinite(baseline[k]):
            b = sy(baseline[k])
            parts.append(f'<line class="gap" x1="{_px(x)}" x2="{_px(x)}" y1="{_px(y)}" y2="{_px(b)}" stroke="#9aa4ae"/>'
                         f'<circle class="self" data-concept="{k}" cx="{_px(x)}" cy="{_px(b)}" r="4.5" fill="white" '
                         f'stroke="#6b7280" stroke-width="1.3"/>')
        tooltip = _xml(f"{name} concept {k}: similarity {similarity[k]:.3f}, self {baseline[k]:.3f}, x {x_values[k]:.3f}")
        parts.append(
            f'<circle class="point{" marked" if k in marked else ""}" data-owner="{_xml(name)}" data-concept="{k}" '
            f'data-x="{float(x_values[k])!r}" data-y="{float(similarity[k])!r}" cx="{_px(x)}" cy="{_px(y)}" r="5.5" '
            f'fill="{colour}"><title>{tooltip}</title></circle>'
            f'<text x="{_px(x + 7)}" y="{_px(y - 5)}" font-size="{11 if k in marked else 9}"'
            f'{weight} fill="{colour}">{k}</text>')
    undefined = int((~defined).sum())
    if undefined:
        parts.append(f'<text class="undefined" x="{left + 4}" y="{top + plot_height - 5}" font-size="10" fill="#555555">'
                     f"{undefined} undefined, not shown</text>")
    x_label = "importance (normalized, −1 to 1)" if by_importance else "self baseline (importance disabled)"
    parts.append(f'<text x="{_px(left + plot_width / 2)}" y="{top + plot_height + 32}" text-anchor="middle" '
                 f'font-size="12">{_xml(x_label)}</text>'
                 f'<text transform="translate({x0 + 14},{_px(top + plot_height / 2)}) rotate(-90)" text-anchor="middle" '
                 f'dominant-baseline="central" font-size="12">similarity (Pearson r)</text>')
    legend = [("point", _POINT_COLOUR, f"{predictor} predicts it ({direction})")]
    if by_importance:
        legend.append(("self", "#6b7280", "self baseline (owner predicts it)"))
    legend.append(("point", _MARKED_COLOUR, f"{len(marked)} lowest similarity"))
    y = top + plot_height + 42
    parts.append('<g class="legend">')
    for kind, colour, text in legend:
        marker = (f'<circle cx="{left + 14}" cy="{y + 5}" r="4" fill="white" stroke="{colour}" stroke-width="1.3"/>'
                  if kind == "self" else f'<circle cx="{left + 14}" cy="{y + 5}" r="4.5" fill="{colour}"/>')
        parts.append(marker + f'<text x="{left + 24}" y="{y + 9}" font-size="11">{_xml(_fit(text, plot_width - 30, 11))}</text>')
        y += 15
    parts.append("</g></g>")
    return "\n".join(parts)


def write_class_concepts_svg(path, title: str, panels: Sequence[Mapping], n_marked: int = 3) -> Path:
    """Write ``class_concepts_svg`` to ``path`` (then renamed into place), creating its folder."""
    from rsvc_cli.store.artifact import write_text_replacing

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_replacing(path, class_concepts_svg(title, panels, n_marked))
    return path
