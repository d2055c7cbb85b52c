"""A self-contained HTML report: an overview table of every concept and one page per class.

``write_report(out_dir, report)`` writes ``out_dir/index.html`` and ``out_dir/classes/*.html``.
Everything a browser needs is inline (CSS, a little vanilla JS for sorting and filtering): no CDN,
no fonts, no server, so the folder can be opened from disk (file://), zipped or copied to a cluster
share. Images are referenced relative to ``out_dir``; the caller writes them there.

The report dict (JSON-able)::

    {"title": str, "subtitle": str, "meta": {key: value},
     "banner": str or None (a warning shown at the top of every page, e.g. random weights),
     "provenance": {key: text} (what made the numbers, shown as its own block),
     "models": {"model1": "cifar_resnet20 · layer3", "model2": "..."},
     "labels": {"model1": "cifar_resnet20", "model2": "..."} (what the models are called; default model1/model2),
     "classes": [{"name": "cat", "plots": ["rel/path.svg", ...],
                  "concepts": [{"owner": "model1", "concept": 0, "direction": "2->1",
                                "similarity": 0.71, "self_similarity": 0.95,
                                "best_match": {"owner": "model2", "concept": 4, "correlation": 0.62} or None,
                                "importance": 0.3,
                                "square_content": 0.9 (the key only where squares were planted),
                                "collages": {"top": "rel.png", "over": "rel.png", "under": "rel.png"},
                                "heatmap": "rel.png", "heatmap_image": "cat/0001.png (image 7)",
                                "heatmap_max": 2.3}, ...]}, ...],
     "layer_heatmaps": ["rel.png", ...]}

Undefined numbers (None, NaN) are shown as "—" and always sort last. With 100 classes x 20 concept
cards the index stays a table (no images but the layer heatmaps) and every card image is lazy.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from rsvc_cli.store.artifact import write_text_replacing

from rsvc_cli.errors import RsvcError

UNDEFINED = "—"

# Short visible caption ({predictor} is the model that predicts the concept), and the precise
# definition as a tooltip.
COLLAGE_LABELS = {
    "top": ("what the concept is", "the patches with the largest true coefficients, one per image"),
    "over": (
        "{predictor} predicts it where it is absent",
        "most negative error e = true - predicted coefficient, one patch per image",
    ),
    "under": (
        "{predictor} misses it",
        "most positive error e = true - predicted among patches below the smallest top coefficient",
    ),
}

# (key in a concept dict, column header, tooltip) of the numeric overview columns, in order.
_NUMBER_COLUMNS = (
    ("similarity", "similarity", "held-out Pearson r between true and predicted coefficients"),
    ("self_similarity", "self baseline", "the same read-out from the owner's own activations"),
    ("importance", "importance", "integrated gradients in concept space, normalized per class"),
    ("square_content", "square content", "share of the top patches that contain the planted square"),
)

# Beside a similarity of 0 that means the other model predicts a constant (no feature it can use).
_UNPREDICTABLE_MARK = ('<span class="unpredictable" title="unpredictable: the other model\'s features predict a '
                       'constant (the lasso kept no weight); similarity 0">unpredictable</span>')

_CSS = """
:root { --ink: #1b1f24; --muted: #5b6570; --line: #d8dde3; --soft: #f4f6f8; --accent: #1f5fa8; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #fff; }
header.page { padding: 18px 28px 10px; border-bottom: 1px solid var(--line); background: var(--soft); }
header.page h1 { margin: 0 0 4px; font-size: 22px; }
.subtitle { margin: 0; color: var(--muted); }
main { padding: 10px 28px 40px; max-width: 1500px; }
h2 { font-size: 17px; margin: 22px 0 8px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
table { border-collapse: collapse; }
table.kv td, table.kv th { padding: 2px 12px 2px 0; text-align: left; vertical-align: top; }
table.kv th { color: var(--muted); font-weight: 600; }
.banner { margin: 8px 0; padding: 8px 12px; border: 2px solid #b45309; background: #fef3c7; color: #78350f;
  font-weight: 700; }
table.concepts { width: 100%; font-variant-numeric: tabular-nums; }
table.concepts th, table.concepts td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; }
table.concepts td.num, table.concepts th.num { text-align: right; }
table.concepts thead th { position: sticky; top: 0; background: var(--soft); cursor: pointer; user-select: none;
                          white-space: nowrap; }
table.concepts thead th:hover { background: #e6ebf0; }
th[aria-sort="ascending"]::after { content: " \\25B2"; font-size: 10px; }
th[aria-sort="descending"]::after { content: " \\25BC"; font-size: 10px; }
table.concepts tbody tr:hover { background: #f7fafd; }
.undefined { color: var(--muted); }
.toolbar { display: flex; gap: 12px; align-items: center; margin: 6px 0 8px; color: var(--muted); }
.toolbar input { font: inherit; padding: 4px 8px; border: 1px solid var(--line); border-radius: 4px; width: 260px; }
nav.classes { display: flex; flex-wrap: wrap; gap: 6px; }
nav.classes a { border: 1px solid var(--line); border-radius: 12px; padding: 2px 10px; background: #fff; }
nav.classes a .lowest { color: var(--muted); font-size: 12px; }
nav.crumbs { display: flex; gap: 16px; margin-bottom: 6px; }
.figures { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
.figures img, .card img { max-width: 100%; height: auto; border: 1px solid var(--line); }
article.card { border: 1px solid var(--line); border-radius: 6px; padding: 12px 16px; margin: 16px 0;
               scroll-margin-top: 8px; }
article.card:target { border-color: var(--accent); box-shadow: 0 0 0 2px #c9dcf2; }
article.card h3 { margin: 0 0 6px; font-size: 16px; }
dl.stats { display: flex; flex-wrap: wrap; gap: 4px 22px; margin: 0 0 10px; }
dl.stats div { display: flex; gap: 6px; }
dl.stats dt { color: var(--muted); }
dl.stats dd { margin: 0; font-weight: 600; font-variant-numeric: tabular-nums; }
.collages { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
figure { margin: 0; }
figcaption { font-size: 12px; color: var(--muted); margin-bottom: 3px; }
.collages figure { max-width: 100%; }
figcaption b { color: var(--ink); }
.missing { display: inline-block; padding: 18px; background: var(--soft); color: var(--muted);
           border: 1px dashed var(--line); font-size: 12px; }
details.all-classes { margin-top: 30px; }
#how-to-read { margin-top: 22px; }
#how-to-read summary { cursor: pointer; }
#how-to-read summary h2 { display: inline; }
dl.glossary { display: grid; grid-template-columns: max-content 1fr; gap: 3px 14px; margin: 8px 0; max-width: 1100px; }
dl.glossary dt { font-weight: 600; }
dl.glossary dd { margin: 0; color: var(--muted); }
.colourbar { display: flex; align-items: center; gap: 6px; font-size: 12px; color: var(--muted); margin-top: 4px; }
.colourbar .ramp { display: inline-block; width: 140px; height: 10px; border: 1px solid var(--line); }
"""

# Sorting and filtering for every table.concepts. Undefined cells (empty data-sort) sort last in
# both directions; ties keep their current order.
_JS = """
(function () {
  "use strict";
  function sortTable(table, column) {
    var header = table.tHead.rows[0].cells[column];
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (cell) {
      cell.setAttribute("aria-sort", "none");
    });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var numeric = header.getAttribute("data-type") === "number";
    var body = table.tBodies[0];
    var keyed = Array.prototype.map.call(body.rows, function (row, position) {
      var cell = row.cells[column];
      var raw = cell.getAttribute("data-sort");
      if (raw === null) { raw = cell.textContent; }
      var value = numeric ? (raw === "" ? NaN : parseFloat(raw)) : raw.toLowerCase();
      var missing = numeric ? isNaN(value) : raw === "";
      return { row: row, value: value, missing: missing, position: position };
    });
    keyed.sort(function (a, b) {
      if (a.missing || b.missing) {
        return a.missing === b.missing ? a.position - b.position : (a.missing ? 1 : -1);
      }
      var order = numeric ? a.value - b.value
                          : a.value.localeCompare(b.value, undefined, { numeric: true });
      if (!ascending) { order = -order; }
      return order || a.position - b.position;
    });
    var fragment = document.createDocumentFragment();
    keyed.forEach(function (item) { fragment.appendChild(item.row); });
    body.appendChild(fragment);
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.concepts"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (header, column) {
      header.addEventListener("click", function () { sortTable(table, column); });
      header.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sortTable(table, column); }
      });
    });
  });
  Array.prototype.forEach.call(document.querySelectorAll("input[data-filter]"), function (input) {
    var table = document.getElementById(input.getAttribute("data-filter"));
    var count = document.getElementById(input.getAttribute("data-filter") + "-count");
    input.addEventListener("input", function () {
      var query = input.value.trim().toLowerCase();
      var shown = 0;
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
        var visible = query === "" || row.textContent.toLowerCase().indexOf(query) !== -1;
        row.hidden = !visible;
        if (visible) { shown += 1; }
      });
      if (count) { count.textContent = shown + " shown"; }
    });
  });
})();
"""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _escape(value) -> str:
    return html.escape(str(value), quote=True)


def _number(value) -> float | None:
    """A finite float, or None for undefined (None, NaN, inf, or not a number at all)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _number_cell(value, digits: int = 3) -> str:
    number = _number(value)
    if number is None:
        return f'<td class="num undefined" data-sort="" title="undefined">{UNDEFINED}</td>'
    return f'<td class="num" data-sort="{number!r}">{number:.{digits}f}</td>'


def _number_text(value, digits: int = 3) -> str:
    number = _number(value)
    if number is None:
        return f'<span class="undefined" title="undefined">{UNDEFINED}</span>'
    return f"{number:.{digits}f}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-")[:60] or "x"


def _self_direction(direction: str) -> str:
    """"2->1" -> "1->1": the self baseline of the concept's owner."""
    parts = str(direction).split("->")
    return f"{parts[-1]}->{parts[-1]}" if len(parts) == 2 else "self"


def _predictor(direction: str, labels: Mapping | None = None) -> str:
    """"2->1" -> "model2" (or its label): the model whose activations predict the concept."""
    parts = str(direction).split("->")
    if not (len(parts) == 2 and parts[0]):
        return "the other model"
    return _model_name(f"model{parts[0]}", labels)


def _model_name(owner: str, labels: Mapping | None) -> str:
    """What the report calls ``owner`` ("model1"): its label where given, else the key itself."""
    return str((labels or {}).get(owner) or owner)


class _Images:
    """Turns report image paths into <img> tags relative to the page, with their pixel sizes.

    Width and height let the browser reserve space before a lazy image loads, so scrolling a page
    of 20 cards does not jump around or fetch every image at once.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self._sizes: dict[str, tuple[int, int] | None] = {}

    def relative(self, path) -> str:
        path = str(path).replace("\\", "/")
        if os.path.isabs(path):
            path = os.path.relpath(path, self.out_dir).replace("\\", "/")
        return path

    def size(self, relative: str) -> tuple[int, int] | None:
        if relative not in self._sizes:
            path = self.out_dir / relative
            size = None
            try:
                if path.suffix.lower() == ".svg":
                    # PIL cannot open SVG: read the integer width and height of the root <svg>
                    # element, which our charts write in their first line.
                    with open(path, "rb") as file:
                        root = re.search(rb"<svg\b[^>]*>", file.read(4096))
                    attributes = dict(re.findall(rb'\s(width|height)="(\d+)"', root[0])) if root else {}
                    if attributes.keys() == {b"width", b"height"}:
                        size = (int(attributes[b"width"]), int(attributes[b"height"]))
                else:
                    with Image.open(path) as image:
                        size = image.size
            except (OSError, ValueError):
                pass
            self._sizes[relative] = size
        return self._sizes[relative]

    def tag(self, path, alt: str, prefix: str = "", lazy: bool = True) -> str:
        if not path:
            return f'<span class="missing">no {_escape(alt)}</span>'
        relative = self.relative(path)
        size = self.size(relative)
        if size is None:
            return f'<span class="missing">missing image: {_escape(relative)}</span>'
        source = _escape(prefix + quote(relative, safe="/"))
        loading = ' loading="lazy"' if lazy else ""
        return f'<img src="{source}" alt="{_escape(alt)}" width="{size[0]}" height="{size[1]}"{loading} decoding="async">'


def _page(title: str, header: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_escape(title)}</title>\n"
        '<link rel="icon" href="data:,">\n'  # no favicon request (a console error on file://)
        f"<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<header class="page">\n{header}\n</header>\n<main>\n{body}\n</main>\n'
        f"<script>{_JS}</script>\n</body>\n</html>\n"
    )


def _key_value_table(rows: Mapping) -> str:
    lines = []
    for key, value in rows.items():
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value, default=str)
        lines.append(f"<tr><th>{_escape(key)}</th><td>{_escape(value)}</td></tr>")
    return '<table class="kv">' + "".join(lines) + "</table>"


# --------------------------------------------------------------------------------------------
# Concepts
# --------------------------------------------------------------------------------------------


class _ConceptEntry:
    """One concept of one class, with where its card lives."""

    def __init__(self, class_position: int, class_name: str, page: str, concept: Mapping, card_id: str):
        self.class_position = class_position
        self.class_name = class_name
        self.page = page
        self.concept = concept
        self.card_id = card_id

    @property
    def sort_key(self):
        similarity = _number(self.concept.get("similarity"))
        # Lowest similarity first (the concepts unique to their model), undefined last.
        return (
            similarity is None,
            similarity if similarity is not None else 0.0,
            self.class_position,
            str(self.concept.get("owner", "")),
            _number(self.concept.get("concept")) or 0.0,
        )


def _concept_label(concept: Mapping, labels: Mapping | None = None) -> str:
    owner = _model_name(str(concept.get("owner", "?")), labels)
    return f"{owner} · concept {concept.get('concept', '?')} · {concept.get('direction', '?')}"


def _number_columns(entries: Sequence[_ConceptEntry]):
    """The numeric columns worth showing: square content only where some concept has it (planted squares)."""
    planted = any("square_content" in entry.concept for entry in entries)
    return [column for column in _NUMBER_COLUMNS if column[0] != "square_content" or planted]


def _overview_table(entries: Sequence[_ConceptEntry], table_id: str, on_class_page: bool,
                    labels: Mapping | None = None) -> str:
    """The sortable concept table; on a class page it links to cards on the same page and has no class column."""
    with_class = not on_class_page
    headers = []
    if with_class:
        headers.append('<th data-type="text" tabindex="0" aria-sort="none">class</th>')
    headers += [
        '<th data-type="text" tabindex="0" aria-sort="none">owner</th>',
        '<th data-type="number" class="num" tabindex="0" aria-sort="none">concept</th>',
        '<th data-type="text" tabindex="0" aria-sort="none">direction</th>',
    ]
    columns = _number_columns(entries)
    for key, label, tooltip in columns:
        # The rows are written lowest similarity first: say so in the header.
        state = "ascending" if key == "similarity" else "none"
        headers.append(
            f'<th data-type="number" class="num" tabindex="0" aria-sort="{state}" '
            f'title="{_escape(tooltip)}">{_escape(label)}</th>'
        )
    rows = []
    for entry in entries:
        concept = entry.concept
        page_href = "" if on_class_page else _escape(quote(entry.page, safe="/"))
        href = f"{page_href}#{entry.card_id}"
        cells = []
        if with_class:
            cells.append(
                f'<td data-sort="{_escape(entry.class_name)}"><a href="{page_href}">{_escape(entry.class_name)}</a></td>'
            )
        concept_number = _number(concept.get("concept"))
        cells += [
            f"<td>{_escape(_model_name(str(concept.get('owner', '')), labels))}</td>",
            f'<td class="num" data-sort="{"" if concept_number is None else repr(concept_number)}">'
            f'<a href="{href}">{_escape(concept.get("concept", UNDEFINED))}</a></td>',
            f"<td>{_escape(concept.get('direction', ''))}</td>",
        ]
        cells += [_number_cell(concept.get(key)) for key, _, _ in columns]
        if concept.get("unpredictable"):
            # The similarity cell: 0 because the other model predicts a constant, and it says so.
            position = len(cells) - len(columns)
            cells[position] = cells[position].replace("</td>", f" {_UNPREDICTABLE_MARK}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="toolbar"><input type="search" placeholder="filter rows (class, owner, …)" '
        f'data-filter="{table_id}" aria-label="filter rows"><span id="{table_id}-count">{len(entries)} concepts</span>'
        "<span>click a column header to sort</span></div>\n"
        f'<table class="concepts" id="{table_id}"><thead><tr>{"".join(headers)}</tr></thead>\n'
        "<tbody>\n" + "\n".join(rows) + "\n</tbody></table>"
    )


def _best_match_text(concept: Mapping, labels: Mapping | None, card_ids: Mapping) -> str:
    """The other model's concept this one correlates with most, linked to its card, and the correlation."""
    match = concept.get("best_match")
    if not isinstance(match, Mapping):
        return _number_text(None)
    name = f"{_model_name(str(match.get('owner', '')), labels)} concept {match.get('concept', '?')}"
    card = card_ids.get((str(match.get("owner")), _number(match.get("concept"))))
    linked = f'<a href="#{card}">{_escape(name)}</a>' if card else _escape(name)
    return f'{linked} (r {_number_text(match.get("correlation"))})'


# viridis at 0, 0.25, 0.5, 0.75 and 1: the heatmaps' colour scale (viz.collage), drawn as a CSS gradient.
_VIRIDIS_STOPS = "#440154, #3b528b, #21918c, #5ec962, #fde725"


def _heatmap_figure(concept: Mapping, images: _Images) -> str:
    heatmap = concept.get("heatmap")
    if not heatmap:
        return ""
    image = concept.get("heatmap_image")
    named = f" of {_escape(image)}" if image else " over its best image"
    top = _number(concept.get("heatmap_max"))
    colour_bar = (
        f'<div class="colourbar" title="concept coefficient, averaged where patches overlap; grey: no patch">'
        f'<span>0</span><span class="ramp" style="background: linear-gradient(to right, {_VIRIDIS_STOPS})"></span>'
        f"<span>{top:.2f}</span> coefficient</div>" if top is not None else ""
    )
    return (f'<figure class="heatmap"><figcaption><b>heatmap</b> — the concept\'s coefficients{named}'
            f'</figcaption>{images.tag(heatmap, "heatmap", prefix="../")}{colour_bar}</figure>')


def _concept_card(entry: _ConceptEntry, models: Mapping, images: _Images, labels: Mapping | None = None,
                  card_ids: Mapping | None = None) -> str:
    concept = entry.concept
    direction = str(concept.get("direction", ""))
    owner = str(concept.get("owner", ""))
    similarity = _number(concept.get("similarity"))
    self_similarity = _number(concept.get("self_similarity"))
    gap = None if similarity is None or self_similarity is None else self_similarity - similarity
    stats = [
        ("similarity", f"similarity {direction}", _number_text(similarity)),
        ("self", f"self baseline {_self_direction(direction)}", _number_text(self_similarity)),
        ("gap", "gap to self", _number_text(gap)),
        *([("unpredictable", "unpredictable", _UNPREDICTABLE_MARK)] if concept.get("unpredictable") else []),
        ("best-match", "best match", _best_match_text(concept, labels, card_ids or {})),
        ("importance", "importance", _number_text(concept.get("importance"))),
    ]
    if "square_content" in concept:  # only where squares were planted
        stats.append(("square", "square content", _number_text(concept.get("square_content"))))
    stats_html = "".join(f'<div class="stat-{key}"><dt>{_escape(name)}</dt><dd>{value}</dd></div>'
                         for key, name, value in stats)
    collages = concept.get("collages") or {}
    figures = []
    predictor = _predictor(direction, labels)
    for kind, (caption, definition) in COLLAGE_LABELS.items():
        tag = images.tag(collages.get(kind), f"{kind} collage", prefix="../")
        figures.append(
            f'<figure class="collage collage-{kind}" title="{_escape(definition)}"><figcaption><b>{kind}</b> — '
            f"{_escape(caption.format(predictor=predictor))}</figcaption>{tag}</figure>"
        )
    figures.append(_heatmap_figure(concept, images))
    owner_model = models.get(owner)
    owner_line = f'<p class="subtitle">{_escape(owner)}: {_escape(owner_model)}</p>' if owner_model else ""
    return (
        f'<article class="card" id="{entry.card_id}">\n<h3>{_escape(_concept_label(concept, labels))}</h3>\n{owner_line}\n'
        f'<dl class="stats">{stats_html}</dl>\n<div class="collages">{"".join(figures)}</div>\n</article>'
    )


# --------------------------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------------------------


def _validate(report) -> None:
    if not isinstance(report, Mapping) or not isinstance(report.get("classes", []), (list, tuple)):
        raise RsvcError(
            problem="The report description is not a mapping with a list under 'classes'.",
            fix="Build the report from the scores with the collage stage instead of by hand.",
        )
    for position, class_entry in enumerate(report.get("classes", [])):
        if not isinstance(class_entry, Mapping) or not isinstance(class_entry.get("concepts", []), (list, tuple)):
            raise RsvcError(
                problem=f"Class entry {position} of the report is not a mapping with a list under 'concepts'.",
                fix="Build the report from the scores with the collage stage instead of by hand.",
            )


def _how_to_read(labels: Mapping) -> str:
    one, two = _model_name("model1", labels), _model_name("model2", labels)
    items = (
        ("concept", f"a direction in one model's activations, found by NMF on the patches of one class; {one} and "
                    f"{two} each have their own, and concept k of one has nothing to do with concept k of the other."),
        ("similarity", f"how well the other model predicts a concept from its own activations (held-out Pearson r "
                       f"between true and predicted coefficients). \"2->1\": {two} predicts {one}'s concepts; "
                       f"\"1->2\": the reverse."),
        ("unpredictable", "the other model's features predict a constant (the lasso kept no weight): similarity 0, "
                          "marked wherever similarities are listed."),
        ("self baseline", "the same read-out from the concept's own model (\"1->1\", \"2->2\"): the best a "
                          "prediction can do with this regression on these patches."),
        ("gap", "self baseline minus similarity: a large gap marks a concept the other model lacks (model-specific)."),
        ("importance", "how much the class output relies on the concept (integrated gradients in concept space, "
                       "normalized per class to [-1, 1]; negative: the concept argues against the class)."),
        ("best match", "the other model's concept that correlates most with this one on the same patches."),
        ("collages", "top: the patches where the concept is strongest (what it is); over: where the other model "
                     "predicts it but it is absent; under: where it is present but the other model misses it. "
                     "Each tile gives its image number, true (t) and predicted (p) coefficients."),
    )
    rows = "".join(f"<dt>{_escape(name)}</dt><dd>{_escape(text)}</dd>" for name, text in items)
    return (f'<section id="how-to-read"><details open><summary><h2>How to read this</h2></summary>'
            f'<dl class="glossary">{rows}</dl></details></section>')


def write_report(out_dir, report: Mapping) -> Path:
    """Write ``out_dir/index.html`` and one page per class under ``out_dir/classes/``.

    Returns the path of index.html. Image paths in ``report`` are relative to ``out_dir``; an image
    that is not there shows as a "missing image" box instead of a broken picture.
    """
    _validate(report)
    out_dir = Path(out_dir)
    (out_dir / "classes").mkdir(parents=True, exist_ok=True)
    images = _Images(out_dir)
    title = str(report.get("title") or "RSVC report")
    subtitle = str(report.get("subtitle") or "")
    models = report.get("models") or {}
    labels = report.get("labels") or {}
    classes = list(report.get("classes", []))
    banner = f'\n<p class="banner" role="alert">{_escape(report["banner"])}</p>' if report.get("banner") else ""

    pages = [f"classes/{position:03d}-{_slug(entry.get('name', position))}.html" for position, entry in enumerate(classes)]
    entries_by_class: list[list[_ConceptEntry]] = []
    for position, class_entry in enumerate(classes):
        used_ids: set[str] = set()
        entries = []
        for concept in class_entry.get("concepts", []):
            card_id = "card-" + _slug(
                f"{concept.get('owner', 'model')}-concept-{concept.get('concept', 'x')}-"
                f"{str(concept.get('direction', '')).replace('->', 'to')}"
            )
            unique_id, suffix = card_id, 2
            while unique_id in used_ids:
                unique_id, suffix = f"{card_id}-{suffix}", suffix + 1
            used_ids.add(unique_id)
            entries.append(_ConceptEntry(position, str(class_entry.get("name", position)), pages[position], concept, unique_id))
        entries_by_class.append(entries)

    # Class pages first, the index last: an index on disk means the report is complete.
    class_links = []
    for position, (class_entry, entries) in enumerate(zip(classes, entries_by_class)):
        name = str(class_entry.get("name", position))
        crumbs = ['<a href="../index.html">← overview</a>']
        if position > 0:
            previous = classes[position - 1].get("name", position - 1)
            crumbs.append(f'<a href="{_escape(quote(os.path.basename(pages[position - 1])))}" rel="prev">'
                          f"← {_escape(previous)}</a>")
        if position + 1 < len(classes):
            following = classes[position + 1].get("name", position + 1)
            crumbs.append(f'<a href="{_escape(quote(os.path.basename(pages[position + 1])))}" rel="next">'
                          f"{_escape(following)} →</a>")
        header = (
            f'<nav class="crumbs">{"".join(crumbs)}</nav>\n<h1>{_escape(name)}</h1>\n'
            f'<p class="subtitle">{_escape(title)}{" — " + _escape(subtitle) if subtitle else ""}</p>'
        ) + banner
        plots = "".join(images.tag(plot, f"{name} plot", prefix="../") for plot in class_entry.get("plots", []) or [])
        sorted_entries = sorted(entries, key=lambda entry: entry.sort_key)
        card_ids = {(str(entry.concept.get("owner")), _number(entry.concept.get("concept"))): entry.card_id
                    for entry in entries}
        body = []
        if plots:
            body.append(f'<section id="plots"><h2>Plots</h2><div class="figures">{plots}</div></section>')
        body.append(
            '<section id="summary"><h2>Concepts</h2>'
            + _overview_table(sorted_entries, "class-table", on_class_page=True, labels=labels)
            + "</section>"
        )
        body.append(
            '<section id="cards"><h2>Concept cards</h2>\n'
            + "\n".join(_concept_card(entry, models, images, labels, card_ids) for entry in sorted_entries)
            + "</section>"
        )
        all_links = "".join(
            f'<a href="{_escape(quote(os.path.basename(pages[other])))}">{_escape(other_entry.get("name", other))}</a>'
            for other, other_entry in enumerate(classes)
        )
        body.append(
            f'<details class="all-classes"><summary>all {len(classes)} classes</summary>'
            f'<nav class="classes">{all_links}</nav></details>'
        )
        write_text_replacing(out_dir / pages[position], _page(f"{name} — {title}", header, "\n".join(body)))

        similarities = [s for s in (_number(entry.concept.get("similarity")) for entry in entries) if s is not None]
        lowest = f"{min(similarities):.2f}" if similarities else UNDEFINED
        class_links.append(
            f'<a href="{_escape(quote(pages[position], safe="/"))}" title="lowest similarity {lowest}">'
            f'{_escape(name)} <span class="lowest">{lowest}</span></a>'
        )

    header = f"<h1>{_escape(title)}</h1>" + (f'\n<p class="subtitle">{_escape(subtitle)}</p>' if subtitle else "")
    header += banner
    body = []
    if models:
        body.append(f'<section id="models"><h2>Models</h2>{_key_value_table(models)}</section>')
    if report.get("meta"):
        body.append(f'<section id="meta"><h2>Run</h2>{_key_value_table(report["meta"])}</section>')
    if report.get("provenance"):
        body.append(f'<section id="provenance"><h2>Provenance</h2>{_key_value_table(report["provenance"])}</section>')
    body.append(_how_to_read(labels))
    body.append(
        f'<section id="classes"><h2>Classes</h2><p class="subtitle">lowest similarity per class in grey</p>'
        f'<nav class="classes">{"".join(class_links)}</nav></section>'
    )
    layer_heatmaps = report.get("layer_heatmaps") or []
    if layer_heatmaps:
        tags = "".join(images.tag(path, "layer heatmap", lazy=False) for path in layer_heatmaps)
        body.append(f'<section id="layers"><h2>Layers</h2><div class="figures">{tags}</div></section>')
    all_entries = sorted((entry for entries in entries_by_class for entry in entries), key=lambda entry: entry.sort_key)
    body.append(
        '<section id="overview"><h2>All concepts</h2>'
        '<p class="subtitle">lowest similarity first: the concepts the other model cannot predict</p>'
        + _overview_table(all_entries, "overview-table", on_class_page=False, labels=labels)
        + "</section>"
    )
    index_path = out_dir / "index.html"
    write_text_replacing(index_path, _page(title, header, "\n".join(body)))
    return index_path
