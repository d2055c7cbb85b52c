"""Planted squares: deterministic in (seed, key), probabilities honoured, boxes right in every frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rsvc_cli.data.imagefolder import ImageFolderSource
from rsvc_cli.data.patches import PatchDataset, boxes_in_original_pixels, patch_grid
from rsvc_cli.data.planting import (
    MAGENTA,
    Planting,
    box_overlap,
    paint_box,
    plant_square,
    planting_keys,
    square_placement,
)
from rsvc_cli.data.synthetic import SyntheticSource
from rsvc_cli.errors import RsvcError

# Planted fraction over N_KEYS keys may deviate from the probability by this many binomial sigmas.
PROBABILITY_SIGMAS = 4.5
N_KEYS = 2000


class StubSource:
    """Non-square random images with given labels (picklable)."""

    def __init__(self, sizes, labels, seed=0):
        rng = np.random.default_rng(seed)
        # Greens only, so no original pixel is magenta.
        self.images = [np.stack([np.zeros((h, w)), rng.integers(0, 256, (h, w)), np.zeros((h, w))], axis=2)
                       .astype(np.uint8) for w, h in sizes]
        self.labels = np.asarray(labels, np.int64)
        self.class_names = ["a", "b"]
        self.paths = [f"stub/{self.class_names[label]}/{index}.png" for index, label in enumerate(labels)]

    def load_image(self, index):
        return Image.fromarray(self.images[index])


def _is_magenta(pixels):
    return np.all(np.asarray(pixels)[..., :3] == np.asarray(MAGENTA), axis=-1)


@pytest.mark.parametrize("seed", [0, 7])
def test_placement_depends_only_on_seed_and_key(seed):
    keys = [f"cat/{index}.jpg" for index in range(50)]
    first = [square_placement(key, 0.5, 4, 32, 32, seed) for key in keys]
    again = [Planting(0.5, seed=seed).plant(np.zeros((32, 32, 3), np.uint8), key, 0.5)[1] for key in keys]
    for one, two in zip(first, again):
        assert (one is None and two is None) or np.array_equal(one, two)
    other_seed = [square_placement(key, 1.0, 4, 32, 32, seed + 1) for key in keys]
    always = [square_placement(key, 1.0, 4, 32, 32, seed) for key in keys]
    assert sum(np.array_equal(one, two) for one, two in zip(always, other_seed)) < 5
    # Raising the probability only adds squares; planted ones stay where they were.
    for low, high in zip(first, always):
        assert low is None or np.array_equal(low, high)


@pytest.mark.parametrize("probability", [0.0, 0.1, 0.5, 1.0])
def test_probability_honoured(probability):
    planted = np.array([square_placement(f"k{index}", probability, 4, 32, 32) is not None for index in range(N_KEYS)])
    sigma = np.sqrt(probability * (1 - probability) / N_KEYS)
    assert abs(planted.mean() - probability) <= PROBABILITY_SIGMAS * sigma


def test_positions_cover_the_image_and_stay_inside():
    boxes = np.array([square_placement(f"k{index}", 1.0, 5, 40, 30) for index in range(N_KEYS)])
    assert boxes[:, 0].min() == 0 and boxes[:, 2].max() == 40
    assert boxes[:, 1].min() == 0 and boxes[:, 3].max() == 30
    np.testing.assert_array_equal(boxes[:, 2] - boxes[:, 0], 5)
    np.testing.assert_array_equal(boxes[:, 3] - boxes[:, 1], 5)


@pytest.mark.parametrize("as_pil", [False, True])
def test_box_pixels_are_the_colour_and_nothing_else_changes(as_pil):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)
    image = Image.fromarray(pixels) if as_pil else pixels
    planted, box = plant_square(image, "some/key.jpg", probability=1.0, size=4)
    assert type(planted) is type(image)
    planted = np.asarray(planted)
    x0, y0, x1, y1 = box.astype(int)
    assert _is_magenta(planted[y0:y1, x0:x1]).all()
    outside = np.ones((32, 32), bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(planted[outside], pixels[outside])
    np.testing.assert_array_equal(np.asarray(image), pixels)  # input not modified
    unchanged, none = plant_square(image, "some/key.jpg", probability=0.0)
    assert none is None and unchanged is image


def test_paint_box_fractional():
    painted = paint_box(np.zeros((10, 10, 3), np.uint8), [1.4, 2.6, 4.5, 5.5])
    np.testing.assert_array_equal(np.argwhere(_is_magenta(painted)).min(0), [3, 1])
    np.testing.assert_array_equal(np.argwhere(_is_magenta(painted)).max(0), [4, 3])


def test_box_overlap_against_pixel_masks():
    rng = np.random.default_rng(0)
    size = 20
    patch_boxes = patch_grid(size, 6, 4)
    for _ in range(50):
        x0, y0 = rng.integers(0, size - 3, size=2)
        square = np.array([x0, y0, x0 + 3, y0 + 3], dtype=float)
        square_mask = np.zeros((size, size), bool)
        square_mask[y0:y0 + 3, x0:x0 + 3] = True
        covered = np.array([square_mask[b[1]:b[3], b[0]:b[2]].sum() for b in patch_boxes])
        np.testing.assert_array_equal(box_overlap(patch_boxes, square), covered > 0)
        np.testing.assert_array_equal(box_overlap(patch_boxes, square, min_fraction=0.5), covered >= 4.5)
        np.testing.assert_array_equal(box_overlap(patch_boxes, square, min_fraction=1.0), covered == 9)


def test_box_overlap_nan_and_broadcasting():
    patch_boxes = np.broadcast_to(patch_grid(32, 9, 7), (3, 16, 4))
    squares = np.array([[0, 0, 4, 4], [np.nan] * 4, [30, 30, 32, 32]], dtype=float)[:, None, :]
    overlap = box_overlap(patch_boxes, squares)
    assert overlap.shape == (3, 16)
    assert overlap[0, 0] and overlap[0].sum() == 1
    assert not overlap[1].any()
    assert not overlap[2].any()  # the grid stops at 30: the corner square lies outside every patch


def test_probabilities_from_list_mapping_and_scalar():
    names = ["cat", "dog", "ship"]
    np.testing.assert_array_equal(Planting([0.1, 0.2, 0.3]).probabilities(names), [0.1, 0.2, 0.3])
    np.testing.assert_array_equal(Planting({"dog": 1.0, 2: 0.5}).probabilities(names), [0.0, 1.0, 0.5])
    np.testing.assert_array_equal(Planting({"0": 0.25}).probabilities(names), [0.25, 0.0, 0.0])
    np.testing.assert_array_equal(Planting(0.3).probabilities(names), [0.3] * 3)


@pytest.mark.parametrize(
    "spec,message", [([0.5, 0.5], "2 values for 3 classes"), ({"dgo": 1.0}, "close: dog"), ([0.5, 1.5, 0], "outside")]
)
def test_probability_errors(spec, message):
    with pytest.raises(RsvcError, match=message):
        Planting(spec).probabilities(["cat", "dog", "ship"])


def test_bad_colour_and_size():
    with pytest.raises(RsvcError, match="color"):
        Planting(color=(300, 0, 0))
    with pytest.raises(RsvcError, match="size"):
        square_placement("k", 1.0, 40, 32, 32)


def test_keys_are_class_and_file_name(tmp_path):
    (tmp_path / "r" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "r" / "cat" / "x.png")
    source = ImageFolderSource(tmp_path / "r")
    assert planting_keys(source, [0]) == ["cat/x.png"]
    assert planting_keys(SyntheticSource(2, 3), [4]) == [f"{SyntheticSource(2, 3).class_names[1]}/1"]


def test_patch_dataset_square_in_original_pixels():
    sizes = [(60, 40), (40, 70), (32, 32), (50, 50)] * 10
    labels = [0, 1] * 20
    source = StubSource(sizes, labels)
    planting = Planting({"a": 1.0, "b": 0.0}, size=4, seed=3)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    whole = PatchDataset(source, np.arange(40), 32, mean, std, None, None, planting=planting)
    grid = PatchDataset(source, np.arange(40), 32, mean, std, 9, 7, planting=planting)
    for item in range(40):
        patches, index, _, square = whole[item]
        width, height = sizes[index]
        if labels[index] == 1:
            assert torch.isnan(square).all()
            continue
        # The input image is the single whole-image patch; find its magenta pixels.
        input_pixels = np.rint((patches[0] * 0.5 + 0.5).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        rows, columns = np.nonzero(_is_magenta(input_pixels))
        input_box = [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]
        assert input_box[2] - input_box[0] == 4 and input_box[3] - input_box[1] == 4
        np.testing.assert_allclose(square.numpy(), boxes_in_original_pixels(input_box, width, height, 32), rtol=1e-6)
        # Patch boxes and square box share a frame: overlap in original pixels equals overlap in input pixels.
        _, _, patch_boxes, grid_square = grid[item]
        torch.testing.assert_close(grid_square, square)
        in_input = np.array([_is_magenta(input_pixels[b[1]:b[3], b[0]:b[2]]).any() for b in grid.patch_boxes])
        np.testing.assert_array_equal(box_overlap(patch_boxes.numpy(), square.numpy()), in_input)
