"""Plots for the report: per-class similarities, similarity vs importance, layer x layer heatmaps.

The per-class similarity bars, drawn for every class of every comparison, are written as a
hand-made SVG by ``write_class_similarities_svg``: about a millisecond each instead of a quarter
second through matplotlib, sharp at any zoom, and any browser opens it offline. The matplotlib
version (``make_class_similarities_figure``) stays, with the same axis and colours.

Figures are built on matplotlib's object API with the Agg canvas, never ``pyplot``: no global
figure state, no GUI backend, safe in worker processes. Each ``plot_*`` writes a PNG and returns its
path; each ``make_*_figure`` returns the figure so tests can inspect what was drawn.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
# Direction strings follow DESIGN.md: "2->1" = model 1's concepts predicted from model 2.
# Self baselines are drawn hollow and grey-ish so the cross-model bars stand out against them.
_DIRECTION_COLOURS = {"2->1": "#1f77b4", "1->2": "#d62728", "1->1": "#9ecae1", "2->2": "#f4a5a5"}
_FALLBACK_COLOURS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _plain(text) -> str:
    """Text as matplotlib should print it: a '$' pair would otherwise start math mode."""
    return str(text).replace("$", r"\$")


def _is_self_baseline(direction: str) -> bool:
    parts = direction.split("->")
    return len(parts) == 2 and parts[0] == parts[1]


def _similarity_rows(similarities: Mapping[str, Sequence[float]]) -> tuple[list[str], np.ndarray]:
    """The directions in the caller's order, and their values as a (directions x concepts) array."""
    directions = list(similarities)
    values = np.array([np.asarray(similarities[d], dtype=np.float64).reshape(-1) for d in directions])
    if values.ndim != 2:
        raise ValueError("every direction needs one similarity per concept, all of the same length")
    return directions, values


def _similarity_axis(values: np.ndarray) -> tuple[float, float, list[float]]:
    """y limits and ticks of the similarity bars: ticks every 0.2 from below the lowest value (or 0)
    up to 1, the limits a little beyond; the headroom up to 1.25 keeps the legend clear of the bars."""
    finite = values[np.isfinite(values)]
    lowest = min(0.0, float(finite.min())) if finite.size else 0.0
    ticks = [step / 5 for step in range(math.floor(lowest * 5), 6)]
    return min(lowest - 0.05, ticks[0]), 1.25, ticks


def _direction_colours(directions: Sequence[str]) -> list[str]:
    fallback = itertools.cycle(_FALLBACK_COLOURS)
    return [_DIRECTION_COLOURS.get(direction) or next(fallback) for direction in directions]


def _similarity_chart_inches(n_concepts: int, n_directions: int) -> tuple[float, float]:
    return max(5.0, 0.55 * n_concepts * max(n_directions, 1) ** 0.5 + 2.5), 3.4


def _save(figure: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def make_class_similarities_figure(
    title: str,
    similarities: Mapping[str, Sequence[float]],
    concept_labels: Sequence[str] | None = None,
    ylabel: str = "similarity (Pearson r)",
) -> Figure:
    """Grouped bars: one group per concept, one bar per direction (e.g. "2->1" next to "1->1").

    All arrays in ``similarities`` describe the same k concepts, in the same order. NaN
    (undefined) similarities get no bar and an "n/a" mark at zero.
    """
    directions, values = _similarity_rows(similarities)
    n_directions, n_concepts = values.shape
    if concept_labels is None:
        concept_labels = [str(i) for i in range(n_concepts)]

    figure = Figure(figsize=_similarity_chart_inches(n_concepts, n_directions))
    axes = figure.add_subplot()
    width = 0.8 / max(n_directions, 1)
    positions = np.arange(n_concepts)
    for row, (direction, colour) in enumerate(zip(directions, _direction_colours(directions))):
        offset = (row - (n_directions - 1) / 2) * width
        finite = np.isfinite(values[row])
        hatch = "//" if _is_self_baseline(direction) else None
        axes.bar(
            positions[finite] + offset,
            values[row, finite],
            width=width * 0.95,
            color=colour,
            edgecolor="#333333" if hatch else colour,
            linewidth=0.5,
            hatch=hatch,
            label=_plain(direction),
        )
        for x in positions[~finite] + offset:
            axes.text(x, 0.0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90, color="#555555")
    axes.axhline(0.0, color="#333333", linewidth=0.6)
    y_min, y_max, ticks = _similarity_axis(values)
    axes.set_ylim(y_min, y_max)
    axes.set_yticks(ticks)
    axes.set_xticks(positions, [_plain(label) for label in concept_labels])
    axes.set_xlabel("concept")
    axes.set_ylabel(_plain(ylabel))
    axes.set_title(_plain(title), fontsize=10)
    axes.grid(axis="y", color="#dddddd", linewidth=0.5)
    axes.set_axisbelow(True)
    axes.legend(fontsize=7, ncol=max(1, n_directions), loc="upper right", framealpha=0.9)
    # Fixed margins in inches instead of tight_layout, which draws the whole figure once more to
    # measure it: a report draws one of these per class and comparison, a sweep hundreds.
    width, height = figure.get_size_inches()
    figure.subplots_adjust(left=0.7 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.3 / height)
    return figure


def plot_class_similarities(
    path,
    title: str,
    similarities: Mapping[str, Sequence[float]],
    concept_labels: Sequence[str] | None = None,
    ylabel: str = "similarity (Pearson r)",
) -> Path:
    """Write the grouped similarity bars of one class (see ``make_class_similarities_figure``)."""
    return _save(make_class_similarities_figure(title, similarities, concept_labels, ylabel), path)


# The SVG bar chart, in pixels: the PNG's size (inches x DPI) and fixed margins.
_SVG_MARGIN_LEFT, _SVG_MARGIN_RIGHT, _SVG_MARGIN_TOP, _SVG_MARGIN_BOTTOM = 77, 17, 33, 55
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
    # Five decimals keep bar heights exact far below a pixel, so values can be read back from them.
    return f"{value:.5f}".rstrip("0").rstrip(".")


def class_similarities_svg(
    title: str,
    similarities: Mapping[str, Sequence[float]],
    concept_labels: Sequence[str] | None = None,
    ylabel: str = "similarity (Pearson r)",
) -> str:
    """The chart of ``make_class_similarities_figure`` as an SVG document, drawn without matplotlib.

    Same content: a group of bars per concept, a bar per direction in the given order, self
    baselines hatched, NaN as no bar and an "n/a" mark. Value v is drawn at y = y(0) - v * scale
    pixels; bars (``class="bar"``) and grid lines (``class="grid"``) carry their value in
    ``data-value``, so a reader can check one against the other. Each bar has a <title> tooltip,
    shown when the SVG is opened by itself (browsers show none inside an <img>).
    """
    directions, values = _similarity_rows(similarities)
    n_directions, n_concepts = values.shape
    labels = [str(i) for i in range(n_concepts)] if concept_labels is None else list(concept_labels)
    colours = _direction_colours(directions)
    inches = _similarity_chart_inches(n_concepts, n_directions)
    width, height = round(inches[0] * DPI), round(inches[1] * DPI)
    left, top = _SVG_MARGIN_LEFT, _SVG_MARGIN_TOP
    plot_width = width - left - _SVG_MARGIN_RIGHT
    plot_height = height - top - _SVG_MARGIN_BOTTOM
    bottom = top + plot_height
    y_min, y_max, ticks = _similarity_axis(values)
    scale = plot_height / (y_max - y_min)
    zero = top + y_max * scale
    group = plot_width / max(n_concepts, 1)
    bar = 0.8 * group / max(n_directions, 1)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'font-family="{_SVG_FONT}" font-size="12" fill="#222222">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        "<defs>",
    ]
    fills = []
    for row, (direction, colour) in enumerate(zip(directions, colours)):
        if not _is_self_baseline(direction):
            fills.append(f'fill="{colour}" stroke="{colour}" stroke-width="0.5"')
            continue
        parts.append(
            f'<pattern id="hatch{row}" width="8" height="8" patternUnits="userSpaceOnUse" '
            f'patternTransform="rotate(45)">'
            f'<rect width="8" height="8" fill="{colour}"/><line x1="0" y1="0" x2="0" y2="8" stroke="{_SVG_OUTLINE}"/>'
            "</pattern>"
        )
        fills.append(f'fill="url(#hatch{row})" stroke="{_SVG_OUTLINE}" stroke-width="0.5"')
    parts.append("</defs>")

    for tick in ticks:
        y = _px(zero - tick * scale)
        parts.append(
            f'<line class="grid" data-value="{tick!r}" x1="{left}" x2="{left + plot_width}" y1="{y}" y2="{y}" '
            f'stroke="#dddddd" stroke-width="0.8"/>'
            f'<text x="{left - 7}" y="{y}" text-anchor="end" dominant-baseline="central">'
            f'{f"{tick:.1f}".replace("-", "−")}</text>'
        )
    for row, direction in enumerate(directions):
        for concept, value in enumerate(values[row]):
            x = left + (concept + 0.5) * group + (row - (n_directions - 1) / 2) * bar
            if not np.isfinite(value):
                parts.append(
                    f'<text class="na" transform="translate({_px(x)},{_px(zero - 3)}) rotate(-90)" font-size="9" '
                    f'fill="#555555" dominant-baseline="central">n/a</text>'
                )
                continue
            tooltip = _xml(f"{direction}, concept {labels[concept]}: {value:.3f}")
            parts.append(
                f'<rect class="bar" data-value="{float(value)!r}" x="{_px(x - 0.475 * bar)}" '
                f'y="{_px(zero - max(value, 0.0) * scale)}" width="{_px(0.95 * bar)}" '
                f'height="{_px(abs(value) * scale)}" {fills[row]}><title>{tooltip}</title></rect>'
            )
    parts.append(
        f'<line class="zero" x1="{left}" x2="{left + plot_width}" y1="{_px(zero)}" y2="{_px(zero)}" '
        f'stroke="{_SVG_OUTLINE}" stroke-width="0.8"/>'
        f'<rect x="{left}" y="{top}" width="{plot_width}" height="{plot_height}" fill="none" stroke="{_SVG_OUTLINE}"/>'
    )
    for concept, label in enumerate(labels):
        x = _px(left + (concept + 0.5) * group)
        parts.append(
            f'<line x1="{x}" x2="{x}" y1="{bottom}" y2="{bottom + 4}" stroke="{_SVG_OUTLINE}"/>'
            f'<text x="{x}" y="{bottom + 18}" text-anchor="middle">{_xml(_fit(label, group, 12))}</text>'
        )
    title_width = plot_width + 2 * _SVG_MARGIN_RIGHT  # centred over the plot, so the narrower side limits it
    parts += [
        f'<text class="title" x="{_px(left + plot_width / 2)}" y="{top - 11}" text-anchor="middle" font-size="14">'
        f"{_xml(_fit(title, title_width, 14))}</text>",
        f'<text x="{_px(left + plot_width / 2)}" y="{height - 10}" text-anchor="middle" font-size="13">concept</text>',
        f'<text transform="translate(16,{_px(top + plot_height / 2)}) rotate(-90)" text-anchor="middle" '
        f'dominant-baseline="central" font-size="13">{_xml(_fit(ylabel, plot_height, 13))}</text>',
        _svg_legend(directions, fills, right=left + plot_width - 6, top=top + 6),
        "</svg>\n",
    ]
    return "\n".join(parts)


def _svg_legend(directions: Sequence[str], fills: Sequence[str], right: float, top: float) -> str:
    """One row of swatch + direction name per direction, right-aligned at ``right``."""
    font_size = 11
    widths = [14 + 4 + len(direction) * _SVG_CHAR_WIDTH * font_size + 10 for direction in directions]
    x = right - sum(widths) - 8
    entries = [f'<rect x="{_px(x)}" y="{top}" width="{_px(sum(widths) + 8)}" height="20" rx="3" fill="white" '
               f'fill-opacity="0.9" stroke="#cccccc"/>']
    x += 6
    for direction, fill, entry_width in zip(directions, fills, widths):
        entries.append(
            f'<rect x="{_px(x)}" y="{top + 6}" width="14" height="8" {fill}/>'
            f'<text x="{_px(x + 18)}" y="{top + 14}" font-size="{font_size}">{_xml(direction)}</text>'
        )
        x += entry_width
    return '<g class="legend">' + "".join(entries) + "</g>"


def write_class_similarities_svg(
    path,
    title: str,
    similarities: Mapping[str, Sequence[float]],
    concept_labels: Sequence[str] | None = None,
    ylabel: str = "similarity (Pearson r)",
) -> Path:
    """Write ``class_similarities_svg`` to ``path`` (then renamed into place), creating its folder."""
    from rsvc_cli.store.artifact import write_text_replacing

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_replacing(path, class_similarities_svg(title, similarities, concept_labels, ylabel))
    return path


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
        colour = _MARKED_COLOUR if k in marked else _DIRECTION_COLOURS["2->1"]
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
    legend = [("point", _DIRECTION_COLOURS["2->1"], f"{predictor} predicts it ({direction})")]
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
