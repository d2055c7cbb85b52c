"""Plots: written as readable PNGs, drawing what they were given (checked on the figure objects);
the SVG per-class concept figure read back from its markup."""

from __future__ import annotations

import re
from xml.etree import ElementTree

import numpy as np
import pytest
from PIL import Image

from rsvc_cli.viz.plots import (
    class_concepts_svg,
    make_layer_heatmap_figure,
    make_similarity_vs_importance_figure,
    plot_layer_heatmap,
    plot_similarity_vs_importance,
    write_class_concepts_svg,
)
from rsvc_cli.viz.report import _Images

# Positions come back from matplotlib as floats.
VALUE_TOLERANCE = 1e-12
SVG = "{http://www.w3.org/2000/svg}"


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 5, "blank image"


def svg_elements(root, tag: str, kind: str) -> list:
    return [element for element in root.iter(SVG + tag) if element.get("class") == kind]


def two_panels(first="R20", second="R56", k=4):
    values = np.linspace(0.3, 0.9, k)
    return [{"name": name, "predictor": other, "direction": direction, "similarity": values,
             "self_similarity": np.full(k, 0.95), "importance": np.linspace(-0.5, 1.0, k)}
            for name, other, direction in ((first, second, "2->1"), (second, first, "1->2"))]


def test_class_concepts_svg_escapes_text(tmp_path):
    title = 'cat & <dog> "$1" vs $2\'s'
    path = write_class_concepts_svg(tmp_path / "sub" / "cat.svg", title, two_panels("a&b", "<c>"))
    root = ElementTree.parse(path).getroot()
    assert svg_elements(root, "text", "title")[0].text == title
    assert [text.text for text in svg_elements(root, "text", "panel-title")] == ["a&b’s concepts", "<c>’s concepts"]
    assert [file.name for file in path.parent.iterdir()] == ["cat.svg"]  # no temporary file left behind


def test_class_concepts_svg_shortens_a_title_wider_than_the_figure():
    title = "a_rather_long_class_name: similarity against importance " * 10
    root = ElementTree.fromstring(class_concepts_svg(title, two_panels()))
    shown = svg_elements(root, "text", "title")[0].text
    assert shown.endswith("…") and title.startswith(shown[:-1])
    # At least 0.6 font sizes (15 px) per character, the average of DejaVu Sans, fit in the width.
    assert len(shown) * 0.6 * 15 <= int(root.get("width"))


def test_report_image_tags_carry_svg_and_png_sizes(tmp_path):
    """The report sizes its <img> tags from the files: the SVG figure's from its root element."""
    write_class_concepts_svg(tmp_path / "plots" / "cat.svg", "cat", two_panels())
    plot_similarity_vs_importance(tmp_path / "plots" / "cat.png", "cat", [0.1, 0.5], [0.2, -0.3])
    (tmp_path / "plots" / "broken.svg").write_text("<html>not a chart</html>")
    images = _Images(tmp_path)
    sizes = {}
    for name in ("cat.svg", "cat.png"):
        tag = images.tag(tmp_path / "plots" / name, "similarities")
        sizes[name] = tuple(int(v) for v in re.search(r'width="(\d+)" height="(\d+)"', tag).groups())
    assert sizes["cat.svg"] == images.size("plots/cat.svg") == (2 * 430, 380 + 34)  # two panels and the title
    assert sizes["cat.png"] == (round(4.6 * 110), round(3.8 * 110))
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
    baseline = np.array([0.9, 0.8, 0.97])
    panels = [{"name": "a", "predictor": "b", "direction": "2->1", "similarity": [0.2, 0.5, 0.9],
               "self_similarity": baseline, "importance": None}]
    svg = class_concepts_svg("cat", panels)
    np.testing.assert_allclose([float(p["data-x"]) for p in _points(svg)], baseline)
    assert "self baseline (importance disabled)" in svg and 'class="diagonal"' in svg and 'class="self"' not in svg
