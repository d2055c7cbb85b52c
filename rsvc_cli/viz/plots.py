"""PNG plots for the report: per-class similarities, similarity vs importance, layer x layer heatmaps.

Figures are built on matplotlib's object API with the Agg canvas, never ``pyplot``: no global
figure state, no GUI backend, safe in worker processes. Each ``plot_*`` writes a PNG and returns its
path; each ``make_*_figure`` returns the figure so tests can inspect what was drawn.
"""

from __future__ import annotations

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
    directions = list(similarities)
    values = np.array([np.asarray(similarities[d], dtype=np.float64).reshape(-1) for d in directions])
    if values.ndim != 2:
        raise ValueError("every direction needs one similarity per concept, all of the same length")
    n_directions, n_concepts = values.shape
    if concept_labels is None:
        concept_labels = [str(i) for i in range(n_concepts)]

    figure = Figure(figsize=(max(5.0, 0.55 * n_concepts * max(n_directions, 1) ** 0.5 + 2.5), 3.4))
    axes = figure.add_subplot()
    width = 0.8 / max(n_directions, 1)
    positions = np.arange(n_concepts)
    fallback = iter(_FALLBACK_COLOURS * 4)
    for row, direction in enumerate(directions):
        colour = _DIRECTION_COLOURS.get(direction) or next(fallback)
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
    finite_values = values[np.isfinite(values)]
    lowest = min(0.0, float(finite_values.min())) if finite_values.size else 0.0
    # Headroom above 1 keeps the legend clear of the bars.
    axes.set_ylim(lowest - 0.05, 1.25)
    axes.set_yticks(np.arange(np.floor(lowest * 5) / 5, 1.0001, 0.2))
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
