"""The report in a real browser: headless Chromium opens index.html from disk (file://).

Checks what only a browser can: no console or page errors, every image decodes, clicking a header
sorts the table, links lead to the class pages and their cards. Needs Debian's /usr/bin/chromium;
skipped without it locally, a failure in CI (where CI is set).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsvc_cli.viz.plots import write_class_concepts_svg
from rsvc_cli.viz.report import write_report

LABELS = {"model1": "ResNet-20 <a>", "model2": "ResNet-56 & b"}  # markup in names must stay text

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
# Milliseconds Chromium gets for one navigation or image load on a busy two-core machine.
TIMEOUT_MS = 20_000

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI: install Debian's chromium package (apt-get install chromium).")
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright  # after the check: no chromium, no need for playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def fake_report(out_dir: Path, n_classes=3, n_concepts=3, seed=0):
    """A small report with real PNGs of different sizes and colours."""
    rng = np.random.default_rng(seed)

    def png(relative, size):
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels, mode="RGB").save(path)
        return relative

    classes = []
    for class_position in range(n_classes):
        concepts = []
        for owner, other, direction in (("model1", "model2", "2->1"), ("model2", "model1", "1->2")):
            for concept in range(n_concepts):
                stem = f"collages/class {class_position}/{owner}_{concept}"
                concepts.append({
                    "owner": owner, "concept": concept, "direction": direction,
                    "similarity": round(float(rng.uniform(-0.2, 1.0)), 3),
                    "self_similarity": round(float(rng.uniform(0.8, 1.0)), 3),
                    "best_match": {"owner": other, "concept": (concept + 1) % n_concepts,
                                   "correlation": round(float(rng.uniform(0, 1)), 3)},
                    "importance": round(float(rng.uniform(-1, 1)), 3),
                    "collages": {kind: png(f"{stem}_{kind}.png", (200, 120)) for kind in ("top", "over", "under")},
                    "heatmap": png(f"{stem}_heatmap.png", (96, 96)),
                    "heatmap_image": f"cat/{concept:04d}.png (image {concept})", "heatmap_max": 1.5,
                })
        concepts[-1]["similarity"] = None
        panels = [{"name": LABELS[owner], "predictor": LABELS[other], "direction": direction,
                   "similarity": [c["similarity"] if c["similarity"] is not None else np.nan
                                  for c in concepts if c["owner"] == owner],
                   "self_similarity": [c["self_similarity"] for c in concepts if c["owner"] == owner],
                   "importance": [c["importance"] for c in concepts if c["owner"] == owner]}
                  for owner, other, direction in (("model1", "model2", "2->1"), ("model2", "model1", "1->2"))]
        plot = f"plots/{class_position}_concepts.svg"
        write_class_concepts_svg(out_dir / plot, f"class & {class_position}: similarity against importance", panels)
        classes.append({"name": f"class & {class_position}", "plots": [plot], "concepts": concepts})
    return {
        "title": "browser test <report>", "subtitle": "fake numbers", "meta": {"seed": seed},
        "models": {"model1": "a", "model2": "b"}, "labels": LABELS, "classes": classes,
        "layer_heatmaps": [png("plots/layers.png", (160, 160))],
    }


def watch(page):
    """Collect console errors and uncaught page errors from here on."""
    problems = []
    page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
            if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
    return problems


def assert_every_image_loaded(page):
    # Card images are lazy: bring each into view, then wait until the browser has decoded it.
    images = page.locator("img")
    for position in range(images.count()):
        image = images.nth(position)
        image.scroll_into_view_if_needed(timeout=TIMEOUT_MS)
        page.wait_for_function("image => image.complete", arg=image.element_handle(), timeout=TIMEOUT_MS)
        width = image.evaluate("image => image.naturalWidth")
        assert width > 0, f"image {image.get_attribute('src')} did not load"
    return images.count()


def column_values(page, table_id, column):
    return page.eval_on_selector_all(
        f"#{table_id} tbody tr",
        f"rows => rows.map(row => row.cells[{column}].getAttribute('data-sort'))",
    )


def numeric_with_undefined_last(values):
    """(defined values as floats, undefined cells, whether all undefined cells come after the defined)."""
    defined = [float(v) for v in values if v != ""]
    undefined = [v for v in values if v == ""]
    return defined, undefined, values[len(defined):] == undefined


def test_report_works_from_disk(browser, tmp_path):
    report = fake_report(tmp_path / "report")
    index = write_report(tmp_path / "report", report)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = watch(page)
    page.goto(index.as_uri(), timeout=TIMEOUT_MS)
    page.wait_for_load_state("load")
    assert page.title() == "browser test <report>"
    assert assert_every_image_loaded(page) == 1
    page.screenshot(path=str(tmp_path / "index.png"), full_page=True)

    # Default order: lowest similarity first, undefined last.
    similarity_column = 4
    values = column_values(page, "overview-table", similarity_column)
    defined, undefined, undefined_last = numeric_with_undefined_last(values)
    assert defined == sorted(defined) and len(undefined) == len(report["classes"]) and undefined_last

    # Clicking "importance" sorts ascending, clicking again descending; undefined stays last.
    importance_header = page.locator("#overview-table thead th", has_text="importance")
    importance_header.click()
    importance = [float(v) for v in column_values(page, "overview-table", 6)]
    assert importance == sorted(importance)
    assert importance_header.get_attribute("aria-sort") == "ascending"
    importance_header.click()
    assert [float(v) for v in column_values(page, "overview-table", 6)] == sorted(importance, reverse=True)
    page.locator("#overview-table thead th", has_text="similarity").first.click()
    page.locator("#overview-table thead th", has_text="similarity").first.click()
    defined, _, undefined_last = numeric_with_undefined_last(column_values(page, "overview-table", similarity_column))
    assert defined == sorted(defined, reverse=True) and undefined_last
    # Text columns sort too.
    page.locator("#overview-table thead th", has_text="owner").click()
    owners = page.eval_on_selector_all("#overview-table tbody tr", "rows => rows.map(r => r.cells[1].textContent)")
    assert owners == sorted(owners)

    # Filtering hides the other classes' rows.
    page.fill("input[data-filter='overview-table']", "class & 2")
    visible = page.locator("#overview-table tbody tr:visible")
    assert visible.count() == len(report["classes"][2]["concepts"])

    # The class navigation leads to a class page with its cards, all images loaded.
    page.click("nav.classes >> text=class & 1")
    page.wait_for_load_state("load")
    assert page.locator("h1").inner_text() == "class & 1"
    assert page.locator("article.card").count() == len(report["classes"][1]["concepts"])
    assert assert_every_image_loaded(page) == 1 + 4 * len(report["classes"][1]["concepts"])
    page.screenshot(path=str(tmp_path / "class.png"))

    # Cards name their model, their best match in the other model (a link to its card), the heatmap's
    # image and its colour bar; no square content where nothing was planted.
    card = page.locator("article.card").first
    owner = "model1" if LABELS["model1"] in card.locator("h3").inner_text() else "model2"
    other_label = LABELS["model2" if owner == "model1" else "model1"]
    match = card.locator(".stat-best-match a")
    assert other_label in match.inner_text() and "(r 0." in card.locator(".stat-best-match dd").inner_text()
    assert "cat/" in card.locator("figure.heatmap figcaption").inner_text()
    assert card.locator(".colourbar").is_visible() and "1.50" in card.locator(".colourbar").inner_text()
    assert page.locator(".stat-square").count() == 0 and page.locator("th", has_text="square content").count() == 0
    match_target = match.get_attribute("href")
    match.click()
    assert page.evaluate("location.hash") == match_target
    assert other_label in page.locator(f"article.card{match_target} h3").inner_text()

    # A concept link of the class table jumps to its card; "next" and "overview" navigate.
    first_link = page.locator("#class-table tbody tr a").first
    target = first_link.get_attribute("href")
    first_link.click()
    assert page.evaluate("location.hash") == target
    assert page.locator(f"article.card{target}").is_visible()
    page.click("a[rel=next]")
    page.wait_for_load_state("load")
    assert page.locator("h1").inner_text() == "class & 2"
    page.click("text=← overview")
    page.wait_for_load_state("load")
    assert page.url == index.as_uri()

    # The index explains its numbers, naming the models.
    assert page.locator("#how-to-read").is_visible()
    assert LABELS["model2"] + " predicts " + LABELS["model1"] in page.locator("#how-to-read").inner_text()

    # The per-class figure, opened by itself: one panel per model, each titled and its legend naming
    # the other model as the predictor, the lowest similarities marked.
    page.goto((tmp_path / "report" / report["classes"][0]["plots"][0]).as_uri(), timeout=TIMEOUT_MS)
    panels = page.locator("g.panel")
    assert panels.count() == 2
    for position, (owner, other) in enumerate((("model1", "model2"), ("model2", "model1"))):
        text = panels.nth(position).text_content()
        assert LABELS[owner] + "’s concepts" in text and LABELS[other] + " predicts it" in text
        assert panels.nth(position).locator("circle.point").count() >= 2
        assert panels.nth(position).locator("circle.marked").count() >= 1

    assert problems == [], "\n".join(problems)
    page.close()
