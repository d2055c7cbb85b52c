"""Plots: written as readable PNGs, drawing what they were given (checked on the figure objects);
the SVG similarity chart read back with ElementTree."""

from __future__ import annotations

import re
from xml.etree import ElementTree

import numpy as np
import pytest
from matplotlib.patches import Rectangle
from PIL import Image

from rsvc_cli.viz.plots import (
    class_similarities_svg,
    make_class_similarities_figure,
    make_layer_heatmap_figure,
    make_similarity_vs_importance_figure,
    plot_class_similarities,
    plot_layer_heatmap,
    plot_similarity_vs_importance,
    write_class_similarities_svg,
)
from rsvc_cli.viz.report import _Images

# Bar heights and positions come back from matplotlib as floats.
VALUE_TOLERANCE = 1e-12
SVG = "{http://www.w3.org/2000/svg}"
# Four directions, NaN in three of them, one negative value: what a real class looks like.
SIMILARITIES = {
    "2->1": [0.2, np.nan, 0.7, -0.3],
    "1->1": [0.9, 0.8, np.nan, 0.95],
    "1->2": [0.4, 0.1, 0.3, 0.6],
    "2->2": [0.9, 0.9, 0.85, np.nan],
}


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


def svg_elements(root, tag: str, kind: str) -> list:
    return [element for element in root.iter(SVG + tag) if element.get("class") == kind]


def test_class_similarities_svg_draws_each_defined_value_to_scale():
    root = ElementTree.fromstring(class_similarities_svg("cat: concept similarity", SIMILARITIES))
    # The axis, read from the drawing: the grid line at 1.0 sits `scale` pixels above the one at 0.
    grid = {float(line.get("data-value")): float(line.get("y1")) for line in svg_elements(root, "line", "grid")}
    assert sorted(grid) == pytest.approx([-0.4, -0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    zero = float(svg_elements(root, "line", "zero")[0].get("y1"))
    scale = grid[0.0] - grid[1.0]
    assert grid[0.0] == pytest.approx(zero, abs=1e-6 * scale) and scale > 100

    bars = svg_elements(root, "rect", "bar")
    expected = [(d, k, v) for d, values in SIMILARITIES.items() for k, v in enumerate(values) if np.isfinite(v)]
    assert len(bars) == len(expected)
    for bar, (direction, concept, value) in zip(bars, expected):
        assert bar.find(SVG + "title").text == f"{direction}, concept {concept}: {value:.3f}"
        assert float(bar.get("data-value")) == value
        top, height = float(bar.get("y")), float(bar.get("height"))
        assert height == pytest.approx(abs(value) * scale, abs=1e-6 * scale)
        # Positive bars stand on the zero line, negative ones hang below it.
        assert (top + height if value > 0 else top) == pytest.approx(zero, abs=1e-6 * scale)
        if value < 0:
            assert top + height > zero + 10
        # Self baselines are hatched, the cross-model bars filled with their direction's colour.
        assert bar.get("fill").startswith("url(#hatch") == (direction in ("1->1", "2->2"))
    # Groups left to right by concept, within a group the directions in the given order.
    x_by_position = {(k, list(SIMILARITIES).index(d)): float(bar.get("x")) for bar, (d, k, _) in zip(bars, expected)}
    assert [x_by_position[key] for key in sorted(x_by_position)] == sorted(x_by_position.values())

    assert [text.text for text in svg_elements(root, "text", "na")] == ["n/a"] * 3
    legend = svg_elements(root, "g", "legend")[0]
    assert [text.text for text in legend.iter(SVG + "text")] == list(SIMILARITIES)


def test_class_similarities_svg_escapes_text(tmp_path):
    title = 'cat & <dog> "$1" vs $2\'s'
    path = write_class_similarities_svg(tmp_path / "sub" / "cat.svg", title, SIMILARITIES,
                                        ["a&b", "<c>", "$d$", "e"], ylabel="r < 1 & $x$")
    root = ElementTree.parse(path).getroot()
    assert svg_elements(root, "text", "title")[0].text == title
    texts = {text.text for text in root.iter(SVG + "text")}
    assert {"a&b", "<c>", "$d$", "r < 1 & $x$"} <= texts
    assert [file.name for file in path.parent.iterdir()] == ["cat.svg"]  # no temporary file left behind


@pytest.mark.parametrize("n_concepts", [1, 25])
def test_class_similarities_svg_shortens_a_title_wider_than_the_chart(n_concepts):
    title = "a_rather_long_class_name: concept similarity " * 10
    root = ElementTree.fromstring(class_similarities_svg(title, {"2->1": np.linspace(-0.4, 1.0, n_concepts)}))
    shown = svg_elements(root, "text", "title")[0].text
    assert shown.endswith("…") and title.startswith(shown[:-1])
    # At least 0.6 font sizes (14 px) per character, the average of DejaVu Sans, fit in the width.
    assert len(shown) * 0.6 * 14 <= int(root.get("width"))


def test_report_image_tags_carry_svg_and_png_sizes(tmp_path):
    """The report sizes its <img> tags from the files: the SVG chart's from its root element, about
    the size of the PNG it replaces."""
    write_class_similarities_svg(tmp_path / "plots" / "cat.svg", "cat", SIMILARITIES)
    plot_class_similarities(tmp_path / "plots" / "cat.png", "cat", SIMILARITIES)
    (tmp_path / "plots" / "broken.svg").write_text("<html>not a chart</html>")
    images = _Images(tmp_path)
    sizes = {}
    for name in ("cat.svg", "cat.png"):
        tag = images.tag(tmp_path / "plots" / name, "similarities")
        sizes[name] = tuple(int(v) for v in re.search(r'width="(\d+)" height="(\d+)"', tag).groups())
    # (0.55 x 4 concepts x sqrt(4 directions) + 2.5) x 3.4 inches at 110 dpi
    assert sizes["cat.svg"] == images.size("plots/cat.svg") == (759, 374)
    assert np.allclose(sizes["cat.svg"], sizes["cat.png"], atol=1)
    assert images.size("plots/broken.svg") is None and images.size("plots/absent.svg") is None
    assert "missing image" in images.tag("plots/broken.svg", "similarities")


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


def _points(svg: str) -> list[dict]:
    return [dict(re.findall(r'(data-owner|data-concept|data-x|data-y)="([^"]*)"', match))
            for match in re.findall(r'<circle class="point[^"]*"[^>]*>', svg)]


def test_class_concepts_figure_plots_each_models_own_concepts_at_importance_and_similarity():
    from rsvc_cli.viz.plots import class_concepts_svg

    rng = np.random.default_rng(3)
    similarity = [rng.uniform(0, 1, 6), rng.uniform(0, 1, 4)]
    similarity[1][2] = np.nan
    importance = [rng.uniform(-1, 1, 6), rng.uniform(-1, 1, 4)]
    panels = [{"name": name, "predictor": other, "direction": direction, "similarity": s,
               "self_similarity": np.full(len(s), 0.95), "importance": i}
              for name, other, direction, s, i in zip(("R20", "R56"), ("R56", "R20"), ("2->1", "1->2"), similarity, importance)]
    svg = class_concepts_svg("cat", panels, n_marked=2)
    points = _points(svg)
    for owner, s, i in zip(("R20", "R56"), similarity, importance):
        mine = [p for p in points if p["data-owner"] == owner]
        shown = np.isfinite(s)
        assert [int(p["data-concept"]) for p in mine] == list(np.nonzero(shown)[0])
        np.testing.assert_allclose([float(p["data-x"]) for p in mine], i[shown])
        np.testing.assert_allclose([float(p["data-y"]) for p in mine], s[shown])
    marked = [int(c) for c in re.findall(r'class="point marked"[^>]*data-concept="(\d+)"', svg)]
    assert marked[:2] == sorted(np.argsort(similarity[0])[:2].tolist(), key=lambda k: similarity[0][k])
    assert "1 undefined, not shown" in svg
    assert "R56 predicts it (2-&gt;1)" in svg and "R20’s concepts" in svg and "R56’s concepts" in svg
    assert svg.count('class="self"') == 6 + 3  # a self baseline per defined concept


def test_class_concepts_figure_without_importance_uses_the_self_baseline_and_says_so():
    from rsvc_cli.viz.plots import class_concepts_svg

    baseline = np.array([0.9, 0.8, 0.97])
    panels = [{"name": "a", "predictor": "b", "direction": "2->1", "similarity": [0.2, 0.5, 0.9],
               "self_similarity": baseline, "importance": None}]
    svg = class_concepts_svg("cat", panels)
    np.testing.assert_allclose([float(p["data-x"]) for p in _points(svg)], baseline)
    assert "self baseline (importance disabled)" in svg and 'class="diagonal"' in svg and 'class="self"' not in svg
