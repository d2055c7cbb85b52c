"""Plots: written as readable PNGs, drawing what they were given (checked on the figure objects)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.patches import Rectangle
from PIL import Image

from rsvc_cli.viz.plots import (
    make_class_similarities_figure,
    make_layer_heatmap_figure,
    make_similarity_vs_importance_figure,
    plot_class_similarities,
    plot_layer_heatmap,
    plot_similarity_vs_importance,
)

# Bar heights and positions come back from matplotlib as floats.
VALUE_TOLERANCE = 1e-12


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 5, "blank image"


def test_class_similarities_draws_one_bar_per_defined_value(tmp_path):
    similarities = {"2->1": np.array([0.2, np.nan, 0.7, -0.1]), "1->1": np.array([0.9, 0.8, np.nan, 0.95])}
    figure = make_class_similarities_figure("cat: model1 concepts", similarities)
    axes = figure.axes[0]
    bars = [patch for patch in axes.patches if isinstance(patch, Rectangle)]
    heights = sorted(bar.get_height() for bar in bars)
    expected = sorted(v for values in similarities.values() for v in values if np.isfinite(v))
    assert np.allclose(heights, expected, atol=VALUE_TOLERANCE)
    assert sum(text.get_text() == "n/a" for text in axes.texts) == 2
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["2->1", "1->1"]
    path = plot_class_similarities(tmp_path / "sub" / "cat.png", "cat $1 vs $2", similarities, ["a", "b", "c", "d"])
    assert_png(path)


@pytest.mark.parametrize("n_concepts", [1, 3, 10, 25])
def test_class_similarities_fixed_margins_keep_every_label_inside_the_figure(n_concepts):
    """The bar chart has fixed margins (no tight_layout): titles, tick and axis labels must still fit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    values = np.linspace(-0.4, 1.0, n_concepts)
    figure = make_class_similarities_figure("a_rather_long_class_name: concept similarity",
                                            {d: values for d in ("2->1", "1->1", "1->2", "2->2")})
    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # places the axis labels
    renderer = canvas.get_renderer()
    axes = figure.axes[0]
    texts = [axes.title, axes.xaxis.label, axes.yaxis.label,
             *axes.get_xticklabels(), *axes.get_yticklabels()]
    width, height = figure.bbox.width, figure.bbox.height
    for text in texts:
        if not text.get_text():
            continue
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, text.get_text()


def test_similarity_vs_importance_plots_defined_pairs(tmp_path):
    similarity = np.array([0.1, 0.5, np.nan, 0.9])
    importance = np.array([1.0, -0.5, 0.3, np.nan])
    figure = make_similarity_vs_importance_figure("cat", similarity, importance, ["c0", "c1", "c2", "c3"])
    axes = figure.axes[0]
    offsets = axes.collections[0].get_offsets()
    assert np.allclose(offsets, [[1.0, 0.1], [-0.5, 0.5]], atol=VALUE_TOLERANCE)
    labels = {text.get_text() for text in axes.texts}
    assert {"c0", "c1"} <= labels and "c2" not in labels and "2 undefined, not shown" in labels
    assert_png(plot_similarity_vs_importance(tmp_path / "scatter.png", "cat", similarity, importance))


def test_layer_heatmap_annotates_defined_cells_and_leaves_nan_blank(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.uniform(0.2, 0.9, size=(3, 4))
    matrix[1, 2] = np.nan
    matrix[0, 0] = np.nan
    rows, columns = ["layer1", "layer2", "layer3"], ["s1", "s2", "s3", "s4"]
    figure = make_layer_heatmap_figure("r20 vs r56", matrix, rows, columns, "mean max correlation")
    axes = figure.axes[0]
    annotations = {(round(text.get_position()[1]), round(text.get_position()[0])): text.get_text() for text in axes.texts}
    expected = {(r, c): f"{matrix[r, c]:.2f}" for r in range(3) for c in range(4) if np.isfinite(matrix[r, c])}
    assert annotations == expected
    drawn = axes.images[0].get_array()
    assert np.array_equal(np.ma.getmaskarray(drawn), np.isnan(matrix))
    assert axes.images[0].cmap.get_bad().tolist() == [1.0, 1.0, 1.0, 1.0]
    assert_png(plot_layer_heatmap(tmp_path / "layers.png", "r20 vs r56", matrix, rows, columns, "mmcs",
                                  row_title="model1 layer", col_title="model2 layer"))


def test_layer_heatmap_refuses_mismatched_labels(tmp_path):
    with pytest.raises(ValueError):
        plot_layer_heatmap(tmp_path / "x.png", "t", np.zeros((2, 2)), ["a"], ["b", "c"], "v")


def test_all_nan_heatmap_still_renders(tmp_path):
    path = plot_layer_heatmap(tmp_path / "nan.png", "t", np.full((2, 2), np.nan), ["a", "b"], ["c", "d"], "v")
    assert path.exists()
