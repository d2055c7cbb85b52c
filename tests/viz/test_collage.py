"""Collage selection against a brute-force reading of DESIGN.md step 8, and tiles that prove where they came from.

Synthetic images encode their own coordinates (R = x, G = y, B = image id), so a tile cut from the
wrong image, the wrong box, or the resized model input instead of the original fails visibly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from rsvc_cli.errors import RsvcError
from rsvc_cli.viz.collage import (
    COLLAGE_KINDS,
    compute_patch_average,
    concept_heatmap,
    crop_tile,
    make_concept_collages,
    make_grid,
    select_collage_patches,
)

# Nearest sampling of a fractional box may land one source pixel off at a boundary.
PIXEL_TOLERANCE = 1
# Bicubic tiles average neighbouring pixels: their mean x may drift a little from the box centre.
MEAN_COORDINATE_TOLERANCE = 1.0
# Float tolerance of the matrix-product heatmap against the per-pixel loop.
HEATMAP_TOLERANCE = 1e-9


def coordinate_image(image_id: int, width: int, height: int) -> Image.Image:
    """R = x, G = y, B = image id (all < 256), so every pixel says where it is."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x, y, np.full_like(x, image_id)], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def random_boxes(rng, n: int, width: int, height: int) -> np.ndarray:
    size = rng.uniform(4.0, min(width, height) * 0.6, size=n)
    x0 = rng.uniform(0.0, width - size)
    y0 = rng.uniform(0.0, height - size)
    return np.stack([x0, y0, x0 + size, y0 + size], axis=1)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def brute_force_best_per_image(scores, image_index, allowed, n_tiles):
    """Per image, its best allowed patch (lowest index on ties); then the n best of those."""
    best = {}
    for patch in range(len(scores)):
        if not allowed[patch] or not np.isfinite(scores[patch]):
            continue
        image = image_index[patch]
        if image not in best or scores[patch] > scores[best[image]]:
            best[image] = patch
    ranked = sorted(best.values(), key=lambda patch: (-scores[patch], patch))
    return ranked[:n_tiles]


def brute_force_selection(true, predicted, image_index, n_tiles):
    n = len(true)
    error = [true[i] - predicted[i] for i in range(n)]
    defined = [bool(np.isfinite(true[i]) and np.isfinite(predicted[i])) for i in range(n)]
    top = brute_force_best_per_image(true, image_index, defined, n_tiles)
    over = brute_force_best_per_image([-e for e in error], image_index, defined, n_tiles)
    smallest_top = min(true[i] for i in top) if top else -math.inf
    below = [defined[i] and true[i] < smallest_top for i in range(n)]
    under = brute_force_best_per_image(error, image_index, below, n_tiles)
    return {"top": top, "over": over, "under": under}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n_tiles", [1, 5, 8, 40])
def test_selection_matches_brute_force(seed, n_tiles):
    rng = np.random.default_rng(seed)
    n_images, patches_per_image = 30, 6
    image_index = np.repeat(rng.permutation(n_images), patches_per_image)
    n = image_index.size
    true = rng.gamma(1.0, size=n)
    predicted = true + rng.normal(scale=0.8, size=n)
    if seed % 2:
        # Undefined predictions (and a few undefined truths) must never be picked.
        predicted[rng.choice(n, 10, replace=False)] = np.nan
        true[rng.choice(n, 3, replace=False)] = np.nan
    selection = select_collage_patches(true, predicted, image_index, n_tiles)
    reference = brute_force_selection(list(true), list(predicted), list(image_index), n_tiles)
    for kind in COLLAGE_KINDS:
        assert selection[kind].tolist() == reference[kind], kind
        chosen_images = image_index[selection[kind]]
        assert len(set(chosen_images.tolist())) == len(chosen_images), f"{kind}: two patches of one image"
    if selection["under"].size:
        assert true[selection["under"]].max() < true[selection["top"]].min()


def test_selection_finds_planted_over_and_under_patches():
    # Ten images of four patches. Image 7 patch 2: the other model predicts a concept that is not
    # there (over). Image 3 patch 1: a moderate concept the other model misses (under).
    image_index = np.repeat(np.arange(10), 4)
    true = np.full(40, 0.1)
    true[[0, 4, 8]] = [3.0, 2.5, 2.0]  # the top set: images 0, 1, 2
    predicted = true.copy()
    predicted[7 * 4 + 2] = 2.0
    true[3 * 4 + 1], predicted[3 * 4 + 1] = 1.5, 0.0
    selection = select_collage_patches(true, predicted, image_index, n_tiles=3)
    assert selection["top"].tolist() == [0, 4, 8]
    assert selection["over"][0] == 7 * 4 + 2
    assert selection["under"][0] == 3 * 4 + 1


def test_fewer_images_than_tiles_gives_fewer_tiles():
    image_index = np.array([0, 0, 1, 1])
    selection = select_collage_patches(np.array([1.0, 2.0, 3.0, 0.5]), np.zeros(4), image_index, n_tiles=8)
    assert selection["top"].tolist() == [2, 1]
    # Below the smallest top coefficient (2.0): patches 0 and 3; one grid may reuse an image of another.
    assert selection["under"].tolist() == [0, 3]


def test_selection_rejects_bad_input():
    with pytest.raises(RsvcError):
        select_collage_patches(np.zeros(3), np.zeros(4), np.zeros(3, dtype=int))
    with pytest.raises(RsvcError):
        select_collage_patches(np.zeros(3), np.zeros(3), np.zeros(3, dtype=int), n_tiles=0)


# --------------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_crop_tile_cuts_the_stored_box_from_the_right_image(seed):
    rng = np.random.default_rng(seed)
    tile_size = 48
    images = [coordinate_image(i, int(rng.integers(40, 250)), int(rng.integers(40, 250))) for i in range(6)]
    for image_id, image in enumerate(images):
        for box in random_boxes(rng, 4, *image.size):
            tile = np.asarray(crop_tile(image, box, tile_size, resample=Image.Resampling.NEAREST)).astype(int)
            assert tile.shape == (tile_size, tile_size, 3)
            assert (tile[..., 2] == image_id).all(), "tile taken from another image"
            # Nearest sampling: output pixel u shows source pixel floor(x0 + (u + 1/2) * width / tile_size).
            centres = (np.arange(tile_size) + 0.5) / tile_size
            expected_x = np.floor(box[0] + centres * (box[2] - box[0]))
            expected_y = np.floor(box[1] + centres * (box[3] - box[1]))
            assert np.abs(tile[0, :, 0] - expected_x).max() <= PIXEL_TOLERANCE
            assert np.abs(tile[:, 0, 1] - expected_y).max() <= PIXEL_TOLERANCE
            # Rows share x, columns share y: a tile is an axis-aligned crop, not a warp.
            assert (tile[..., 0] == tile[:1, :, 0]).all() and (tile[..., 1] == tile[:, :1, 1]).all()


def test_crop_tile_default_resampling_is_centred_on_the_box():
    image = coordinate_image(3, 200, 160)
    for box in [(10.0, 20.0, 74.0, 84.0), (100.5, 30.25, 190.5, 120.25), (50.0, 50.0, 59.0, 59.0)]:
        tile = np.asarray(crop_tile(image, box, 96)).astype(float)
        assert (tile[..., 2] == 3).all()
        assert abs(tile[..., 0].mean() - ((box[0] + box[2]) / 2 - 0.5)) <= MEAN_COORDINATE_TOLERANCE
        assert abs(tile[..., 1].mean() - ((box[1] + box[3]) / 2 - 0.5)) <= MEAN_COORDINATE_TOLERANCE


def test_crop_tile_clips_at_the_border_and_refuses_boxes_outside():
    image = coordinate_image(1, 32, 32)
    tile = np.asarray(crop_tile(image, (24.0, -4.0, 40.0, 8.0), 16, resample=Image.Resampling.NEAREST))
    assert tile[..., 0].min() >= 24 and tile[..., 0].max() == 31
    assert tile[..., 1].min() == 0 and tile[..., 1].max() <= 7
    with pytest.raises(RsvcError):
        crop_tile(image, (40.0, 40.0, 50.0, 50.0))


def test_crop_tile_accepts_other_image_modes():
    image = coordinate_image(5, 64, 64).convert("RGBA")
    assert crop_tile(image, (0, 0, 16, 16), 32).mode == "RGB"


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


def test_grid_holds_every_tile_whole():
    tile_size = 40
    colours = [(230, 20, 20), (20, 200, 20), (20, 20, 230), (200, 200, 0), (0, 190, 190)]
    tiles = [Image.new("RGB", (tile_size, tile_size), colour) for colour in colours]
    grid = make_grid(tiles, "concept 3", "a long subtitle " * 8, columns=2, tile_size=tile_size,
                     captions=[f"t {i}\np {i}" for i in range(5)])
    pixels = np.asarray(grid)
    for colour in colours:
        assert (pixels == colour).all(axis=-1).sum() == tile_size * tile_size, colour
    # Title and captions put dark ink on the white background.
    assert (pixels.sum(axis=-1) < 200).sum() > 100
    assert grid.width >= 2 * tile_size


def test_grid_resizes_foreign_tiles_and_handles_no_tiles():
    grid = make_grid([Image.new("RGB", (10, 30), (250, 0, 0))], "t", tile_size=32)
    assert ((np.asarray(grid) == (250, 0, 0)).all(axis=-1)).sum() == 32 * 32
    empty = make_grid([], "no under patches", "none", tile_size=32)
    assert empty.width > 0 and empty.height > 32


def test_concept_collages_show_the_selected_patches_of_the_original_images():
    rng = np.random.default_rng(7)
    n_images, patches_per_image, tile_size = 12, 4, 32
    images = {i: coordinate_image(i, 60 + i, 50 + 2 * i) for i in range(n_images)}
    image_index = np.repeat(np.arange(n_images), patches_per_image)
    patch_box = np.concatenate([random_boxes(rng, patches_per_image, *images[i].size) for i in range(n_images)])
    true = rng.gamma(1.0, size=image_index.size)
    predicted = rng.gamma(1.0, size=image_index.size)
    grids = make_concept_collages(images, patch_box, image_index, true, predicted, "cat · model1 concept 0",
                                  n_tiles=4, columns=4, tile_size=tile_size)
    selection = select_collage_patches(true, predicted, image_index, 4)
    for kind in COLLAGE_KINDS:
        grid = np.asarray(grids[kind])
        for patch in selection[kind]:
            tile = np.asarray(crop_tile(images[image_index[patch]], patch_box[patch], tile_size))
            # The exact tile appears somewhere in the grid: slide over the grid rows that fit.
            found = any(
                (grid[y : y + tile_size, x : x + tile_size] == tile).all()
                for y in range(grid.shape[0] - tile_size + 1)
                for x in range(0, grid.shape[1] - tile_size + 1)
                if (grid[y, x] == tile[0, 0]).all()
            )
            assert found, f"{kind}: tile of patch {patch} missing"


# --------------------------------------------------------------------------------------------
# Heatmaps
# --------------------------------------------------------------------------------------------


def brute_force_patch_average(boxes, values, width, height, supersample):
    """Mean of the covering boxes' values, by sampling each pixel at supersample^2 points."""
    offsets = (np.arange(supersample) + 0.5) / supersample
    mean = np.full((height, width), np.nan)
    for y in range(height):
        for x in range(width):
            weighted, total = 0.0, 0.0
            for (x0, y0, x1, y1), value in zip(boxes, values):
                xs = ((x + offsets >= x0) & (x + offsets < x1)).sum()
                ys = ((y + offsets >= y0) & (y + offsets < y1)).sum()
                weighted += value * xs * ys
                total += xs * ys
            if total:
                mean[y, x] = weighted / total
    return mean


@pytest.mark.parametrize("seed", [0, 1])
def test_patch_average_matches_per_pixel_reference(seed):
    rng = np.random.default_rng(seed)
    width, height = 20, 16
    # Boxes on a half-pixel grid: a 2x2 supersample measures their coverage exactly.
    boxes = np.round(random_boxes(rng, 6, width, height) * 2) / 2
    values = rng.uniform(0, 3, size=6)
    mean, coverage = compute_patch_average(boxes, values, width, height)
    reference = brute_force_patch_average(boxes, values, width, height, supersample=2)
    assert np.array_equal(np.isnan(mean), np.isnan(reference))
    assert np.allclose(mean[~np.isnan(mean)], reference[~np.isnan(reference)], atol=HEATMAP_TOLERANCE)
    assert (coverage >= 0).all()


def test_heatmap_leaves_uncovered_pixels_grey_and_enlarges_small_images():
    image = coordinate_image(9, 32, 32)
    heatmap = concept_heatmap(image, np.array([[0.0, 0.0, 16.0, 16.0]]), np.array([1.0]), min_size=128)
    assert heatmap.size == (128, 128)
    pixels = np.asarray(heatmap)
    original = np.asarray(image.resize((128, 128), Image.Resampling.NEAREST).convert("L").convert("RGB"))
    assert (pixels[64:, 64:] == original[64:, 64:]).all()
    assert not (pixels[:64, :64] == original[:64, :64]).all()


def test_heatmap_colour_follows_the_coefficient():
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    boxes = np.array([[0.0, 0.0, 32.0, 64.0], [32.0, 0.0, 64.0, 64.0]])
    pixels = np.asarray(concept_heatmap(grey, boxes, np.array([0.0, 2.0]), min_size=64)).astype(int)
    low, high = pixels[:, :32].reshape(-1, 3), pixels[:, 32:].reshape(-1, 3)
    assert (low == low[0]).all() and (high == high[0]).all()
    # viridis runs from dark purple (0) to bright yellow (vmax): more red and green at the high end.
    assert high[0, 0] > low[0, 0] and high[0, 1] > low[0, 1] and high[0, 2] < low[0, 2]


# The colour table's step (1/4095 of the range) against viridis' steepest stop-to-stop slope.
VIRIDIS_TABLE_TOLERANCE = 0.1


def test_heatmap_colours_match_viridis_interpolated_between_its_stops():
    from rsvc_cli.viz.collage import _VIRIDIS_STOPS, _viridis

    values = np.concatenate([np.linspace(-0.2, 1.2, 1001), np.random.default_rng(0).uniform(0, 1, 1000)])
    stops = np.linspace(0, 1, len(_VIRIDIS_STOPS))
    exact = np.stack([np.interp(np.clip(values, 0, 1), stops, _VIRIDIS_STOPS[:, c]) for c in range(3)], axis=-1)
    colours = _viridis(values.reshape(-1, 1))
    assert colours.shape == (values.size, 1, 3)
    assert np.abs(colours[:, 0] - exact).max() <= VIRIDIS_TABLE_TOLERANCE
    assert np.array_equal(_viridis(np.array([0.0, 1.0])), _VIRIDIS_STOPS[[0, -1]])


@pytest.mark.parametrize("size", [11, 15])
def test_text_from_cached_glyphs_matches_pillows_own_rendering(size):
    """Captions are laid out glyph by glyph (with kerning); they must look exactly as ImageDraw draws them."""
    from PIL import ImageDraw

    from rsvc_cli.viz.collage import _draw_text, _font, _text_width

    font = _font(size)
    rng = np.random.default_rng(size)
    texts = [f"img {rng.integers(0, 10000)}" for _ in range(30)]
    texts += [f"t {rng.uniform(0, 3):.2f}  p {rng.uniform(-1, 3):.2f}" for _ in range(30)]
    texts += ["AVAVA To Wa ffi LT …", "cat & <dog> $1 vs $2 · 2->1 0.43 (self 0.94)", "élan Ωμέγα 猫", " ", ""]
    for text in texts:
        ours, reference = (Image.new("RGB", (520, 2 * size + 8), (255, 255, 255)) for _ in range(2))
        _draw_text(ours, (3, 4), text, font, (20, 20, 20))
        ImageDraw.Draw(reference).text((3, 4), text, fill=(20, 20, 20), font=font)
        assert np.array_equal(np.asarray(ours), np.asarray(reference)), text
        if text.strip():
            left, _, right, _ = font.getbbox(text)
            assert _text_width(text, font) == right - left, text
