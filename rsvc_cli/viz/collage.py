"""Collages: which patches show a concept, and where the other model gets it wrong (DESIGN.md step 8).

For one concept with true coefficients ``t`` and coefficients ``p`` predicted from the other model's
activations, on the evaluation patches, ``e = t - p`` and, with at most one patch per source image:

- **top**: the patches with the largest ``t`` (what the concept is);
- **over**: the most negative ``e`` (the other model predicts the concept where it is not);
- **under**: the most positive ``e`` among patches whose ``t`` is below the smallest ``t`` of the
  top set (the concept is there, less strongly, and the other model misses it).

Tiles are cut from the *original* images at the stored patch boxes (original pixels), never from
the resized model input, so what a person sees is what the dataset holds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rsvc_cli.errors import RsvcError

COLLAGE_KINDS = ("top", "over", "under")

# What each grid shows, in the words a reader of the report needs.
COLLAGE_DESCRIPTIONS = {
    "top": "largest true coefficient: what the concept is",
    "over": "most negative error (true - predicted): predicted where it is absent",
    "under": "most positive error below the top set: present, but missed",
}

_BACKGROUND = (255, 255, 255)
_EMPTY_CELL = (236, 236, 236)
_TEXT = (20, 20, 20)
_MUTED_TEXT = (90, 90, 90)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def _best_patch_per_image(
    scores: np.ndarray, image_index: np.ndarray, candidate: np.ndarray, n_tiles: int
) -> np.ndarray:
    """Indices of the ``n_tiles`` highest-scoring candidates, at most one per source image.

    Ties go to the lower patch index, so the result is deterministic.
    """
    candidate_index = np.flatnonzero(candidate & np.isfinite(scores))
    if candidate_index.size == 0:
        return np.zeros(0, dtype=np.int64)
    # Highest score first, then lowest patch index: lexsort sorts by the last key first.
    order = candidate_index[np.lexsort((candidate_index, -scores[candidate_index]))]
    # The first time an image appears in that order is its best patch; sorting the first
    # positions keeps the global score order among those best patches.
    _, first_position = np.unique(image_index[order], return_index=True)
    best = order[np.sort(first_position)]
    return best[:n_tiles].astype(np.int64)


def select_collage_patches(
    true_coefficients: np.ndarray,
    predicted_coefficients: np.ndarray,
    image_index: np.ndarray,
    n_tiles: int = 8,
) -> dict[str, np.ndarray]:
    """Pick the top / over / under patches of one concept (indices into the n patches).

    Each of the three arrays holds at most ``n_tiles`` patch indices, best first, and at most one
    patch per source image (the best-scoring one of that image). Patches whose true or predicted
    coefficient is not finite are never picked. Fewer tiles come back when fewer images qualify.
    """
    true_coefficients = np.asarray(true_coefficients, dtype=np.float64)
    predicted_coefficients = np.asarray(predicted_coefficients, dtype=np.float64)
    image_index = np.asarray(image_index)
    if not (true_coefficients.ndim == predicted_coefficients.ndim == image_index.ndim == 1) or not (
        true_coefficients.shape == predicted_coefficients.shape == image_index.shape
    ):
        raise RsvcError(
            problem=(
                "Collage selection needs one true coefficient, one predicted coefficient and one "
                f"image index per patch, got shapes {true_coefficients.shape}, "
                f"{predicted_coefficients.shape} and {image_index.shape}."
            ),
            fix="Rerun the score stage so coefficients and patch records come from the same artifact.",
        )
    if int(n_tiles) < 1:
        raise RsvcError(
            problem=f"A collage needs at least one tile, got n_tiles={n_tiles}.",
            fix="Set collage.n_tiles to a positive number (8 by default).",
        )
    n_tiles = int(n_tiles)

    error = true_coefficients - predicted_coefficients
    # A patch with an undefined prediction tells nothing about over- or under-prediction.
    defined = np.isfinite(true_coefficients) & np.isfinite(predicted_coefficients)

    top = _best_patch_per_image(true_coefficients, image_index, defined, n_tiles)
    over = _best_patch_per_image(-error, image_index, defined, n_tiles)
    if top.size:
        below_top = true_coefficients < true_coefficients[top].min()
    else:
        below_top = np.zeros_like(defined)
    under = _best_patch_per_image(error, image_index, defined & below_top, n_tiles)
    return {"top": top, "over": over, "under": under}


# --------------------------------------------------------------------------------------------
# Tiles and grids
# --------------------------------------------------------------------------------------------


def _resample_filter(box_width: float, box_height: float, tile_size: int, resample):
    if resample is not None and resample != "auto":
        return resample
    # Tiny boxes (CIFAR patches are ~9 px) blown up smoothly look like fog; show their pixels.
    if min(box_width, box_height) * 2 <= tile_size:
        return Image.Resampling.NEAREST
    return Image.Resampling.BICUBIC


def crop_tile(
    image: Image.Image,
    box: Sequence[float],
    tile_size: int = 96,
    resample: int | str | None = "auto",
) -> Image.Image:
    """Cut ``box`` = (x0, y0, x1, y1), in original pixels, out of the original ``image``.

    Returns an RGB ``tile_size`` x ``tile_size`` tile. Fractional boxes are sampled exactly (no
    rounding to whole pixels); a box reaching past the border is clipped to the image. ``resample``
    "auto" uses nearest-neighbour when the tile enlarges the box at least twofold, bicubic otherwise.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    width, height = image.size
    clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or (
        clipped[2] <= clipped[0] or clipped[3] <= clipped[1]
    ):
        raise RsvcError(
            problem=f"Patch box {tuple(box)} does not overlap its {width}x{height} image.",
            fix="Rerun the extract stage: the stored patch boxes do not belong to these images.",
        )
    if image.mode != "RGB":
        image = image.convert("RGB")
    resample = _resample_filter(clipped[2] - clipped[0], clipped[3] - clipped[1], tile_size, resample)
    return image.resize((tile_size, tile_size), resample, box=clipped)


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


# Text is laid out from cached glyphs: a comparison draws thousands of caption lines ("img 812",
# "t 0.52  p 0.31"), nearly all of them distinct, and FreeType layout and rendering of every string
# was half of a collage's time. Each character is rendered once per font; a string is its glyphs
# placed at the pen positions FreeType's basic layout gives (advances, kerning included), which
# reproduces ImageDraw.text pixel for pixel.


@functools.lru_cache(maxsize=None)
def _glyph(char: str, font) -> tuple[np.ndarray | None, tuple[int, int, int, int]]:
    """The coverage (0..255) of one character drawn at the pen position 0, and its box (left, top, right, bottom)."""
    box = font.getbbox(char)
    left, top, right, bottom = box
    if right <= left or bottom <= top:
        return None, box
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), char, fill=255, font=font)
    return np.asarray(mask, dtype=np.int32), box


@functools.lru_cache(maxsize=None)
def _advance(char: str, following: str, font) -> float:
    """How far the pen moves after ``char`` when ``following`` comes next (kerning included)."""
    if not following:
        return font.getlength(char)
    return font.getlength(char + following) - font.getlength(following)


@functools.lru_cache(maxsize=8192)
def _layout(text: str, font) -> tuple[tuple[tuple[np.ndarray, int, int], ...], tuple[int, int, int, int]]:
    """Each visible glyph of ``text`` with its mask's position, and the bounding box of them all."""
    placed, boxes, pen = [], [], 0.0
    for position, char in enumerate(text):
        mask, (left, top, right, bottom) = _glyph(char, font)
        x = round(pen)
        if mask is not None:
            placed.append((mask, x + left, top))
            boxes.append((x + left, top, x + right, bottom))
        pen += _advance(char, text[position + 1:position + 2], font)
    if not boxes:
        return (), (0, 0, 0, 0)
    lefts, tops, rights, bottoms = zip(*boxes)
    return tuple(placed), (min(lefts), min(tops), max(rights), max(bottoms))


def _text_width(text: str, font) -> int:
    left, _, right, _ = _layout(text, font)[1]
    return right - left


@functools.lru_cache(maxsize=8192)
def _text_mask(text: str, font) -> tuple[Image.Image | None, tuple[int, int]]:
    """The coverage mask of ``text`` drawn at (0, 0) and its offset, as ImageDraw.text renders it."""
    placed, (left, top, right, bottom) = _layout(text, font)
    if not placed:
        return None, (0, 0)
    mask = np.zeros((bottom - top, right - left), dtype=np.int32)
    for glyph, x, y in placed:
        # Anti-aliased edges of neighbours overlap: coverage c over m becomes m + (255 - m) c / 255,
        # rounded as Pillow blends (what pasting 255 through the glyph would give, and what
        # ImageDraw.text draws). numpy, not Image.paste: a paste per glyph was a third of a collage.
        region = mask[y - top:y - top + glyph.shape[0], x - left:x - left + glyph.shape[1]]
        blend = (255 - region) * glyph + 128
        region += ((blend >> 8) + blend) >> 8
    return Image.fromarray(mask.astype(np.uint8), mode="L"), (left, top)


def _draw_text(image: Image.Image, xy: tuple[int, int], text: str, font, fill) -> None:
    """ImageDraw.text(xy, text, fill, font) for one line, from the cached mask."""
    mask, (dx, dy) = _text_mask(text, font)
    if mask is not None:
        image.paste(fill, (xy[0] + dx, xy[1] + dy), mask)


@functools.lru_cache(maxsize=8192)
def _fit_text(text: str, font, max_width: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``max_width`` pixels."""
    if _text_width(text, font) <= max_width:
        return text
    while text and _text_width(text + "…", font) > max_width:
        text = text[:-1]
    return text + "…"


@functools.lru_cache(maxsize=1024)
def _wrap_text(text: str, font, max_width: int) -> tuple[str, ...]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if not line or _text_width(candidate, font) <= max_width:
                line = candidate
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return tuple(_fit_text(line, font, max_width) for line in lines)


def make_grid(
    tiles: Sequence[Image.Image],
    title: str,
    subtitle: str = "",
    columns: int = 4,
    tile_size: int = 96,
    captions: Sequence[str] | None = None,
) -> Image.Image:
    """Lay ``tiles`` out in a titled grid, each with an optional caption line (or lines) below.

    Tiles of another size are resized to ``tile_size``. An empty tile list gives a titled grid
    that says so, rather than an error, since a concept may have no "under" patches.
    """
    columns = max(1, int(columns))
    if captions is not None and len(captions) != len(tiles):
        raise ValueError(f"got {len(captions)} captions for {len(tiles)} tiles")
    gap, margin = 4, 8
    title_font, subtitle_font, caption_font = _font(15), _font(11), _font(11)
    line_height = caption_font.getbbox("Ag")[3] + 2
    title_height = title_font.getbbox("Ag")[3] + 4

    n_columns = min(columns, max(len(tiles), 1))
    n_rows = max(1, math.ceil(len(tiles) / columns))
    width = 2 * margin + n_columns * tile_size + (n_columns - 1) * gap
    # A grid of one tile would be too narrow for its title.
    width = max(width, 2 * margin + 2 * tile_size + gap)
    text_width = width - 2 * margin

    subtitle_lines = _wrap_text(subtitle, subtitle_font, text_width) if subtitle else ()
    caption_lines = max((len(c.split("\n")) for c in captions), default=0) if captions else 0
    cell_height = tile_size + caption_lines * line_height + (2 if caption_lines else 0)
    header_height = margin + title_height + len(subtitle_lines) * line_height + 6
    height = header_height + n_rows * cell_height + (n_rows - 1) * gap + margin

    grid = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    _draw_text(grid, (margin, margin), _fit_text(title, title_font, text_width), title_font, _TEXT)
    y = margin + title_height
    for line in subtitle_lines:
        _draw_text(grid, (margin, y), line, subtitle_font, _MUTED_TEXT)
        y += line_height

    if not tiles:
        draw.rectangle(
            (margin, header_height, margin + text_width - 1, header_height + tile_size - 1), fill=_EMPTY_CELL
        )
        _draw_text(grid, (margin + 6, header_height + 6), "no patch qualifies", caption_font, _MUTED_TEXT)
        return grid

    for position, tile in enumerate(tiles):
        row, column = divmod(position, columns)
        x = margin + column * (tile_size + gap)
        y = header_height + row * (cell_height + gap)
        if tile.size != (tile_size, tile_size):
            tile = tile.resize((tile_size, tile_size), Image.Resampling.BICUBIC)
        grid.paste(tile.convert("RGB"), (x, y))
        if captions is not None:
            for line_number, line in enumerate(str(captions[position]).split("\n")):
                line = _fit_text(line, caption_font, tile_size)
                _draw_text(grid, (x, y + tile_size + 1 + line_number * line_height), line, caption_font, _TEXT)
    return grid


# --------------------------------------------------------------------------------------------
# Heatmap
# --------------------------------------------------------------------------------------------

# A few stops of matplotlib's viridis, interpolated: enough for an overlay, no matplotlib import.
_VIRIDIS_STOPS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def _viridis_table(n_levels: int = 4096) -> np.ndarray:
    stops = np.linspace(0.0, 1.0, len(_VIRIDIS_STOPS))
    levels = np.linspace(0.0, 1.0, n_levels)
    return np.stack([np.interp(levels, stops, _VIRIDIS_STOPS[:, channel]) for channel in range(3)], axis=-1)


# Piecewise linear between the stops, tabulated: looking colours up was 13x faster than
# interpolating per pixel (and the heatmaps were a fifth of a collage's time); at 4096 levels a
# colour is within 0.06 of 255 of the exact interpolation.
_VIRIDIS_TABLE = _viridis_table()


def _viridis(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB (float, 0..255), shape (..., 3)."""
    last = len(_VIRIDIS_TABLE) - 1
    level = np.rint(np.clip(values, 0.0, 1.0) * last).astype(np.intp)
    return _VIRIDIS_TABLE[level]


def _coverage(low: np.ndarray, high: np.ndarray, n_pixels: int) -> np.ndarray:
    """How much of each unit pixel [j, j+1) each interval [low, high) covers: (m, n_pixels)."""
    pixel = np.arange(n_pixels, dtype=np.float64)
    overlap = np.minimum(high[:, None], pixel + 1) - np.maximum(low[:, None], pixel)
    return np.clip(overlap, 0.0, 1.0)


def compute_patch_average(
    boxes: np.ndarray, values: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean of the values of the boxes covering each pixel, weighted by covered area.

    Returns (mean (height, width), coverage (height, width)); mean is NaN where nothing covers.
    One matrix product per image instead of a loop over boxes: the area a box covers in pixel
    (i, j) is the product of its row and column overlaps.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(values) & np.isfinite(boxes).all(axis=1)
    boxes, values = boxes[finite], values[finite]
    column_overlap = _coverage(boxes[:, 0], boxes[:, 2], width)  # (m, W)
    row_overlap = _coverage(boxes[:, 1], boxes[:, 3], height)  # (m, H)
    weighted_sum = row_overlap.T @ (values[:, None] * column_overlap)
    coverage = row_overlap.T @ column_overlap
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(coverage > 0, weighted_sum / coverage, np.nan)
    return mean, coverage


def concept_heatmap(
    image: Image.Image,
    boxes: np.ndarray,
    values: np.ndarray,
    alpha: float = 0.6,
    vmax: float | None = None,
    min_size: int = 192,
) -> Image.Image:
    """Overlay one concept's coefficients on the whole ``image``.

    ``boxes`` (m, 4) are that image's patch boxes in original pixels, ``values`` (m,) the concept's
    coefficients there. Overlapping patches are averaged per pixel; the colour scale runs from 0
    to ``vmax`` (default: the largest value, so each heatmap uses its full range). Small images are
    enlarged by a whole factor (nearest) to at least ``min_size`` on the long side so they can be seen.
    The image is shown in grey under the overlay; pixels no patch covers stay grey.
    """
    image = image.convert("RGB")
    scale = max(1, math.ceil(min_size / max(image.size)))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    mean, coverage = compute_patch_average(np.asarray(boxes, dtype=np.float64) * scale, values, *image.size)
    covered = coverage > 0
    if vmax is None:
        vmax = float(np.nanmax(mean)) if covered.any() else 1.0
    normalized = mean / vmax if vmax and vmax > 0 else np.zeros_like(mean)
    # A grey base, so that colour in the overlay always means coefficient, never image content.
    grey = np.asarray(image.convert("L"), dtype=np.float64)[..., None]
    blended = _viridis(np.nan_to_num(normalized)) * alpha
    blended += (1 - alpha) * grey
    np.copyto(blended, grey, where=~covered[..., None])
    return Image.fromarray(np.rint(blended, out=blended).astype(np.uint8), mode="RGB")


# --------------------------------------------------------------------------------------------
# All three grids of one concept
# --------------------------------------------------------------------------------------------


def make_concept_collages(
    images: Mapping[int, Image.Image] | Sequence[Image.Image] | Callable[[int], Image.Image],
    patch_box: np.ndarray,
    image_index: np.ndarray,
    true_coefficients: np.ndarray,
    predicted_coefficients: np.ndarray,
    title: str,
    n_tiles: int = 8,
    columns: int = 4,
    tile_size: int = 96,
) -> dict[str, Image.Image]:
    """Select, crop and lay out the top / over / under grids of one concept.

    ``images`` gives the original image of an image index (a sequence, a mapping, or a function);
    ``patch_box`` (n, 4) and ``image_index`` (n,) describe the n evaluation patches. Each tile's
    caption gives its image index and its true (t) and predicted (p) coefficients.
    """
    get_image = images if callable(images) else images.__getitem__
    patch_box = np.asarray(patch_box, dtype=np.float64)
    image_index = np.asarray(image_index)
    true_coefficients = np.asarray(true_coefficients, dtype=np.float64)
    predicted_coefficients = np.asarray(predicted_coefficients, dtype=np.float64)
    selection = select_collage_patches(true_coefficients, predicted_coefficients, image_index, n_tiles)
    grids = {}
    for kind in COLLAGE_KINDS:
        chosen = selection[kind]
        tiles = [crop_tile(get_image(int(image_index[i])), patch_box[i], tile_size) for i in chosen]
        captions = [
            f"img {int(image_index[i])}\nt {true_coefficients[i]:.2f}  p {predicted_coefficients[i]:.2f}"
            for i in chosen
        ]
        grids[kind] = make_grid(
            tiles, f"{title} · {kind}", COLLAGE_DESCRIPTIONS[kind], columns, tile_size, captions
        )
    return grids
