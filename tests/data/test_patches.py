"""Patch geometry, exact crops, resize/crop agreement with torchvision, and PatchDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from rsvc_cli.data.patches import (
    PatchDataset,
    boxes_in_original_pixels,
    image_to_input_box,
    bilinear_matrix,
    make_patches,
    patch_grid,
    resize_and_crop,
    scaled_patch_geometry,
)
from rsvc_cli.errors import RsvcError

# A linear ramp survives antialiased bilinear resampling up to uint8 rounding (plus filter edge effects).
RAMP_TOLERANCE = 1.0
FLOAT_TOLERANCE = 1e-5
RELATIVE_TOLERANCE = 1e-6  # float32 coordinates up to 224 * 225


class StubSource:
    """A source of given PIL images (picklable), for non-square and coordinate-encoded images."""

    def __init__(self, images, labels=None):
        self.images = [np.asarray(image) for image in images]
        self.labels = np.zeros(len(images), np.int64) if labels is None else np.asarray(labels, np.int64)
        self.class_names = [f"class{index}" for index in range(int(self.labels.max()) + 1)]
        self.paths = [f"stub/{index}.png" for index in range(len(images))]

    def __len__(self):
        return len(self.images)

    def load_image(self, index):
        return Image.fromarray(self.images[index])


def _ramp_image(width, height):
    """R = x, G = y, B = 0 (uint8): pixel values name their own coordinates."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x, y, np.zeros_like(x)], axis=2).astype(np.uint8)


def _coordinate_tensor(size):
    """Float (3, S, S) with channel 0 = x, channel 1 = y, channel 2 = x + size * y."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    return torch.stack([x, y, x + size * y])


@pytest.mark.parametrize("input_size,expected", [(224, (64, 51)), (32, (9, 7)), (448, (128, 102))])
def test_scaled_geometry(input_size, expected):
    assert scaled_patch_geometry(input_size) == expected
    assert scaled_patch_geometry(input_size, size=None) == (None, None)


@pytest.mark.parametrize("input_size", [224, 32])
def test_sixteen_patches_row_major(input_size):
    patch_size, stride = scaled_patch_geometry(input_size)
    boxes = patch_grid(input_size, patch_size, stride)
    assert boxes.shape == (16, 4) and boxes.dtype == np.int64
    for position, (x0, y0, x1, y1) in enumerate(boxes):
        row, column = divmod(position, 4)
        assert (x0, y0) == (column * stride, row * stride)
        assert (x1 - x0, y1 - y0) == (patch_size, patch_size)
    assert boxes.min() >= 0 and boxes.max() <= input_size
    # One more stride would not fit.
    assert boxes[:, 0].max() + stride + patch_size > input_size


def test_whole_image_mode_is_identity():
    boxes = patch_grid(32, None, None)
    np.testing.assert_array_equal(boxes, [[0, 0, 32, 32]])
    image = torch.rand(3, 32, 32)
    patches = make_patches(image, boxes, 32)
    assert patches.shape == (1, 3, 32, 32)
    assert torch.equal(patches[0], image)


@pytest.mark.parametrize("input_size,patch_size,stride", [(32, 9, 7), (224, 64, 51), (40, 40, 1), (16, 5, 3)])
def test_each_patch_is_exactly_its_box(input_size, patch_size, stride):
    image = _coordinate_tensor(input_size)
    boxes = patch_grid(input_size, patch_size, stride)
    patches = make_patches(image, boxes, input_size)
    assert patches.shape == (len(boxes), 3, input_size, input_size)
    for patch, (x0, y0, x1, y1) in zip(patches, boxes.tolist()):
        # Corners of the resized patch are the box's corner pixels (align_corners=False clamps at edges).
        assert patch[0, 0, 0] == x0 and patch[1, 0, 0] == y0
        assert patch[0, -1, -1] == x1 - 1 and patch[1, -1, -1] == y1 - 1
        # Nothing from outside the box: the coordinate channels stay inside it (up to float rounding,
        # far below the weight any pixel from outside would carry).
        slack = FLOAT_TOLERANCE * input_size
        assert x0 - slack <= patch[0].min() and patch[0].max() <= x1 - 1 + slack
        assert y0 - slack <= patch[1].min() and patch[1].max() <= y1 - 1 + slack
        # Bilinear on a linear ramp: pixel j samples x0 + clamp((j + 0.5) * w / S - 0.5, 0, w - 1).
        sample = torch.clamp((torch.arange(input_size) + 0.5) * (x1 - x0) / input_size - 0.5, 0, x1 - x0 - 1)
        torch.testing.assert_close(patch[0, 0], x0 + sample, atol=FLOAT_TOLERANCE, rtol=RELATIVE_TOLERANCE)
        # Oracle: the crop by slicing, resized alone.
        reference = F.interpolate(image[None, :, y0:y1, x0:x1], size=(input_size, input_size), mode="bilinear",
                                  align_corners=False, antialias=False)[0]
        torch.testing.assert_close(patch, reference, atol=FLOAT_TOLERANCE, rtol=RELATIVE_TOLERANCE)


def test_mixed_box_sizes_and_batches():
    image = torch.rand(2, 3, 20, 20)
    boxes = np.array([[0, 0, 5, 5], [3, 2, 13, 9], [10, 10, 20, 20], [1, 1, 6, 6]])
    patches = make_patches(image, boxes, 20)
    assert patches.shape == (2, 4, 3, 20, 20)
    for batch in range(2):
        torch.testing.assert_close(patches[batch], make_patches(image[batch], boxes, 20), atol=0, rtol=0)
    x0, y0, x1, y1 = boxes[1]
    reference = F.interpolate(image[:, :, y0:y1, x0:x1], size=(20, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(patches[:, 1], reference, atol=FLOAT_TOLERANCE, rtol=RELATIVE_TOLERANCE)


@pytest.mark.parametrize("size", [(250, 180), (180, 250), (97, 301), (32, 32), (20, 14), (64, 64)])
def test_resize_and_crop_matches_torchvision(size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    ours = np.asarray(resize_and_crop(image, 64))
    theirs = np.asarray(transforms.CenterCrop(64)(transforms.Resize(64)(image)))
    assert ours.shape == (64, 64, 3)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("width,height", [(250, 180), (180, 250), (200, 200)])
def test_input_box_is_a_centred_square(width, height):
    x0, y0, x1, y1 = image_to_input_box(width, height, 64)
    # The shorter side is covered fully, the longer one centred (to within a resized pixel).
    pixel = max(width, height) / 64
    assert abs((x1 - x0) - (y1 - y0)) <= pixel
    assert abs((x0 + x1) - width) <= pixel and abs((y0 + y1) - height) <= pixel
    if width <= height:
        assert (x0, x1) == (0, width)
    else:
        assert (y0, y1) == (0, height)


@pytest.mark.parametrize("width,height", [(250, 180), (180, 250)])
def test_boxes_map_back_to_original_pixels(width, height):
    input_size = 64
    original = _ramp_image(width, height)
    pixels = np.asarray(resize_and_crop(Image.fromarray(original), input_size), dtype=np.float64)
    boxes = patch_grid(input_size, *scaled_patch_geometry(input_size))
    mapped = boxes_in_original_pixels(boxes, width, height, input_size)
    assert mapped.shape == (16, 4) and mapped.dtype == np.float64
    for (x0, y0, x1, y1), (mx0, my0, mx1, my1) in zip(boxes, mapped):
        # The ramp's value at an input pixel is the original coordinate of its centre minus 0.5;
        # inner pixels avoid the image border, where the antialiasing filter is clipped.
        u, v = np.arange(x0 + 1, x1 - 1), np.arange(y0 + 1, y1 - 1)
        expected_x = mx0 + (u + 0.5 - x0) * (mx1 - mx0) / (x1 - x0) - 0.5
        expected_y = my0 + (v + 0.5 - y0) * (my1 - my0) / (y1 - y0) - 0.5
        np.testing.assert_allclose(pixels[v[0], u, 0], expected_x, atol=RAMP_TOLERANCE)
        np.testing.assert_allclose(pixels[v, u[0], 1], expected_y, atol=RAMP_TOLERANCE)
    # The whole input maps to the input box, and NaN boxes stay NaN.
    np.testing.assert_allclose(boxes_in_original_pixels([0, 0, input_size, input_size], width, height, input_size),
                               image_to_input_box(width, height, input_size))
    assert np.isnan(boxes_in_original_pixels([np.nan] * 4, width, height, input_size)).all()


def test_patch_dataset_item():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8), _ramp_image(32, 32)]
    source = StubSource(images)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    dataset = PatchDataset(source, [1, 0], 32, mean, std, 9, 7)
    assert len(dataset) == 2 and dataset.n_patches == 16
    patches, index, boxes = dataset[1]
    assert index == 0 and patches.shape == (16, 3, 32, 32) and patches.dtype == torch.float32
    assert boxes.shape == (16, 4) and boxes.dtype == torch.float32
    np.testing.assert_allclose(boxes.numpy(), boxes_in_original_pixels(dataset.patch_boxes, 60, 40, 32), rtol=1e-6)
    # Normalization: un-normalized patches equal the patches of the x/255 input image.
    input_pixels = np.asarray(resize_and_crop(source.load_image(0), 32), dtype=np.float32) / 255
    expected = make_patches(torch.from_numpy(input_pixels).permute(2, 0, 1), dataset.patch_boxes, 32)
    unnormalized = patches * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    torch.testing.assert_close(unnormalized, expected, atol=FLOAT_TOLERANCE, rtol=RELATIVE_TOLERANCE)
    # Deterministic.
    torch.testing.assert_close(dataset[1][0], patches, atol=0, rtol=0)


def test_patch_dataset_whole_images_and_workers():
    source = StubSource([_ramp_image(32, 32), _ramp_image(48, 32)])
    dataset = PatchDataset(source, [0, 1], 32, (0.5,) * 3, (0.5,) * 3, None, None)
    patches, _, boxes = dataset[1]
    assert patches.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(boxes[0].numpy(), image_to_input_box(48, 32, 32), rtol=1e-6)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    (batch_patches, batch_index, batch_boxes), = list(loader)
    torch.testing.assert_close(batch_patches[1], patches, atol=0, rtol=0)
    assert batch_index.tolist() == [0, 1]


@pytest.mark.parametrize("with_planting", [False, True])
def test_batch_equals_items_in_extraction_layout(with_planting):
    """`batch` (one crop-and-resize call for many images, written in place) gives the items' numbers exactly."""
    from rsvc_cli.data.planting import Planting

    rng = np.random.default_rng(1)
    source = StubSource([rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8), _ramp_image(32, 32),
                         rng.integers(0, 256, size=(50, 30, 3), dtype=np.uint8)])
    planting = Planting(size=4, class_probability=[1.0], seed=3) if with_planting else None
    dataset = PatchDataset(source, [2, 0, 1], 32, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), 9, 7, planting=planting,
                           return_image=True)
    inputs, b, index, boxes, squares = dataset.batch([1, 2])
    items = [dataset[1], dataset[2]]
    expected = torch.cat([items[0][0], items[1][0], items[0][1][None], items[1][1][None]])
    assert b == 2 and inputs.shape == (2 * 16 + 2, 3, 32, 32)
    torch.testing.assert_close(inputs, expected, atol=0, rtol=0)
    assert index.tolist() == [0, 1]
    torch.testing.assert_close(boxes, torch.stack([items[0][3], items[1][3]]), atol=0, rtol=0)
    torch.testing.assert_close(squares, torch.stack([items[0][4], items[1][4]]), atol=0, rtol=0, equal_nan=True)
    assert bool(torch.isfinite(squares).all()) is with_planting


@pytest.mark.parametrize(
    "kwargs",
    [{"mean": (0.5, 0.5)}, {"std": (0.5, 0.0, 0.5)}, {"patch_size": 40, "stride": 3}, {"interpolation": "cubic"}],
)
def test_patch_dataset_config_errors(kwargs):
    arguments = dict(mean=(0.5,) * 3, std=(0.5,) * 3, patch_size=9, stride=7) | kwargs
    with pytest.raises(RsvcError):
        PatchDataset(StubSource([_ramp_image(32, 32)]), [0], 32, **arguments)


def test_scaled_geometry_too_large():
    with pytest.raises(RsvcError, match="larger"):
        scaled_patch_geometry(32, size=300)


@pytest.mark.parametrize("in_size,out_size", [(9, 32), (46, 160), (64, 224), (7, 7), (30, 12)])
def test_bilinear_matrix_resizes_like_interpolate(in_size, out_size):
    rows = torch.rand(5, 3, in_size, in_size, dtype=torch.float64)
    matrix = bilinear_matrix(in_size, out_size, torch.float64)
    assert torch.allclose(matrix.sum(1), torch.ones(out_size, dtype=torch.float64))  # weights sum to 1
    ours = matrix @ rows @ matrix.T
    reference = F.interpolate(rows, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-12)
