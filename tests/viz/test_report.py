"""The HTML report, read back with the standard library's HTML parser: links resolve, text is escaped,
undefined numbers read "—", the overview starts with the lowest similarity, and card images are lazy."""

from __future__ import annotations

import math
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image

from rsvc_cli.errors import RsvcError
from rsvc_cli.viz.report import UNDEFINED, write_report

HOSTILE_NAME = '<script>alert("x")</script> & "cat"'


class Page(HTMLParser):
    """Collects the tags, ids, links, images and the overview table cells of one page."""

    def __init__(self, path: Path):
        super().__init__(convert_charrefs=True)
        self.path = path
        self.ids: list[str] = []
        self.links: list[str] = []
        self.images: list[dict] = []
        self.scripts = 0
        self.text: list[str] = []
        self.tables: dict[str, dict] = {}
        self._table = None
        self._cell = None
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "table" and "concepts" in attrs.get("class", ""):
            self._table = {"headers": [], "rows": []}
            self.tables[attrs["id"]] = self._table
        if self._table is not None:
            if tag == "tr":
                self._table["rows"].append([])
            if tag in ("td", "th"):
                self._cell = {"tag": tag, "sort": attrs.get("data-sort"), "text": ""}

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        if self._table is not None and tag in ("td", "th") and self._cell is not None:
            self._table["rows"][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell["text"] += data

    def table(self, table_id):
        rows = self.tables[table_id]["rows"]
        header = [cell["text"].strip() for cell in rows[0]]
        return header, rows[1:]


def write_png(path: Path, colour, size=(60, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def fake_report(out_dir: Path, n_classes=3, n_concepts=3, seed=0, with_images=True):
    rng = np.random.default_rng(seed)
    classes = []
    for class_position in range(n_classes):
        name = HOSTILE_NAME if class_position == 1 else f"class {class_position}"
        concepts = []
        for owner, direction in (("model1", "2->1"), ("model2", "1->2")):
            for concept in range(n_concepts):
                stem = f"img/c{class_position}/{owner}-{concept}"
                collages = {}
                for kind in ("top", "over", "under"):
                    if with_images:
                        write_png(out_dir / f"{stem}-{kind}.png", tuple(int(v) for v in rng.integers(0, 255, 3)))
                    collages[kind] = f"{stem}-{kind}.png"
                if with_images:
                    write_png(out_dir / f"{stem}-heat.png", (10, 200, 10))
                concepts.append({
                    "owner": owner, "concept": concept, "direction": direction,
                    "similarity": float(rng.uniform(-0.2, 1.0)), "self_similarity": float(rng.uniform(0.8, 1.0)),
                    "best_match": None, "importance": float(rng.uniform(-1, 1)),
                    "square_content": None, "collages": collages, "heatmap": f"{stem}-heat.png",
                })
        concepts[0]["similarity"] = float("nan")
        concepts[1]["similarity"] = None
        plot = f"plots/class {class_position}.png"
        if with_images:
            write_png(out_dir / plot, (200, 200, 200), (120, 80))
        classes.append({"name": name, "plots": [plot], "concepts": concepts})
    if with_images:
        write_png(out_dir / "plots/layers.png", (90, 90, 200), (100, 100))
    return {
        "title": "r20 vs r56 <layer3>", "subtitle": "CIFAR-10 & test",
        "meta": {"seed": 0, "n_concepts": n_concepts, "store": "/tmp/<store>", "versions": {"torch": "2"}},
        "models": {"model1": "cifar_resnet20 layer3", "model2": "cifar_resnet56 layer3"},
        "classes": classes, "layer_heatmaps": ["plots/layers.png"],
    }


@pytest.fixture
def report_dir(tmp_path):
    report = fake_report(tmp_path)
    index = write_report(tmp_path, report)
    return tmp_path, report, index


def all_pages(out_dir: Path):
    return [out_dir / "index.html", *sorted((out_dir / "classes").glob("*.html"))]


def test_every_link_and_image_resolves(report_dir):
    out_dir, report, index = report_dir
    assert index == out_dir / "index.html"
    pages = all_pages(out_dir)
    assert len(pages) == 1 + len(report["classes"])
    parsed = {page.resolve(): Page(page) for page in pages}
    for page in parsed.values():
        for image in page.images:
            assert (page.path.parent / unquote(image["src"])).is_file(), image["src"]
        for link in page.links:
            parts = urlsplit(link)
            assert not parts.scheme and not parts.netloc, f"external link {link}"
            target = (page.path.parent / unquote(parts.path)).resolve() if parts.path else page.path.resolve()
            assert target in parsed, f"{page.path.name}: {link} points nowhere"
            if parts.fragment:
                assert parts.fragment in parsed[target].ids, f"{page.path.name}: no #{parts.fragment}"
        assert len(page.ids) == len(set(page.ids)), "duplicate ids"


def test_report_is_self_contained_and_card_images_are_lazy(report_dir):
    out_dir, report, _ = report_dir
    for path in all_pages(out_dir):
        text = path.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "@import" not in text
        assert Page(path).scripts == 1
    class_page = Page(sorted((out_dir / "classes").glob("*.html"))[0])
    n_cards = len(report["classes"][0]["concepts"])
    assert len(class_page.images) == 1 + 4 * n_cards  # the plot, three collages and a heatmap per card
    assert all(image.get("loading") == "lazy" for image in class_page.images)
    assert all(int(image["width"]) > 0 and int(image["height"]) > 0 for image in class_page.images)


def test_text_is_escaped(report_dir):
    out_dir, _, _ = report_dir
    for path in all_pages(out_dir):
        raw = path.read_text(encoding="utf-8")
        assert "<script>alert" not in raw and "<layer3>" not in raw and "<store>" not in raw
    index_text = "".join(Page(out_dir / "index.html").text)
    assert HOSTILE_NAME in index_text and "r20 vs r56 <layer3>" in index_text


def test_overview_lists_every_concept_lowest_similarity_first(report_dir):
    out_dir, report, _ = report_dir
    header, rows = Page(out_dir / "index.html").table("overview-table")
    assert header == ["class", "owner", "concept", "direction", "similarity", "self baseline", "importance",
                      "square content"]
    assert len(rows) == sum(len(entry["concepts"]) for entry in report["classes"])
    similarity = [row[4] for row in rows]
    defined = [float(cell["sort"]) for cell in similarity if cell["sort"] != ""]
    assert defined == sorted(defined)
    # Undefined similarities (None and NaN) come last and read "—".
    n_undefined = len(rows) - len(defined)
    assert n_undefined == 2 * len(report["classes"])
    assert all(cell["sort"] == "" and cell["text"] == UNDEFINED for cell in similarity[-n_undefined:])
    assert all(row[7]["text"] == UNDEFINED for row in rows)  # square content is None everywhere
    shown = sorted(round(float(cell["text"]), 3) for cell in similarity if cell["sort"] != "")
    expected = sorted(
        round(concept["similarity"], 3)
        for entry in report["classes"]
        for concept in entry["concepts"]
        if concept["similarity"] is not None and not math.isnan(concept["similarity"])
    )
    assert shown == expected


def test_class_page_has_a_card_per_concept_with_three_labelled_collages(report_dir):
    out_dir, report, _ = report_dir
    page_path = sorted((out_dir / "classes").glob("*.html"))[1]
    page = Page(page_path)
    text = "".join(page.text)
    assert HOSTILE_NAME in text
    cards = [card_id for card_id in page.ids if card_id.startswith("card-")]
    assert len(cards) == len(report["classes"][1]["concepts"])
    for label in ("top", "over", "under", "heatmap"):
        assert text.count(label + " —") == len(cards)
    _, rows = page.table("class-table")
    assert len(rows) == len(cards)


def test_missing_image_shows_a_placeholder(tmp_path):
    report = fake_report(tmp_path, n_classes=1, n_concepts=1, with_images=False)
    write_report(tmp_path, report)
    page = sorted((tmp_path / "classes").glob("*.html"))[0]
    assert Page(page).images == []
    assert "missing image" in page.read_text(encoding="utf-8")


def test_an_empty_report_still_writes_an_index(tmp_path):
    index = write_report(tmp_path / "out", {"title": "nothing yet", "classes": []})
    assert "nothing yet" in index.read_text(encoding="utf-8")


def test_a_malformed_report_is_a_user_error(tmp_path):
    with pytest.raises(RsvcError):
        write_report(tmp_path, {"classes": "cat"})
    with pytest.raises(RsvcError):
        write_report(tmp_path, {"classes": [{"name": "cat", "concepts": 3}]})
