"""Preprocessing travels with the model: timm models see exactly timm's evaluation transform.

Oracle: timm's own `resolve_data_config` + `create_transform` on real JPEGs (CIFAR-10 test images
enlarged to non-square sizes and saved again as JPEG), from the pretrained config of
`resnet50.a2_in1k` (Resize(235, bicubic), CenterCrop(224)) with pretrained=false: no download.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rsvc_cli.data.imagefolder import load_rgb
from rsvc_cli.data.patches import resize_matrix
from rsvc_cli.stages.common import load_image_sets, load_model, patch_dataset, patch_geometry
from tests.conftest import CIFAR_TEST, compose

TRANSFORM_TOL = 1e-6  # float32 rounding of the same operations
RESIZE_TOL = 1e-5  # matrix products against F.interpolate, float32
SIZES = [(300, 260), (257, 341), (224, 224), (500, 231)]


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory, shared_dir):
    """Two class folders of real photographs (CIFAR-10 test JPEGs enlarged, saved again as JPEG)."""
    root = tmp_path_factory.mktemp("jpegs")
    for name in ("cat", "ship"):
        (root / name).mkdir()
        for i, size in enumerate(SIZES):
            image = Image.open(CIFAR_TEST / name / f"{i:04d}.jpg").convert("RGB")
            image.resize(size, Image.Resampling.BICUBIC).save(root / name / f"{i:04d}.jpg", quality=92)
    return root


def _view(root, model_name: str, *overrides: str):
    cfg = compose("extract", f"model={model_name}", "dataset=imagefolder", f"dataset.root={root}",
                  f"dataset.images_per_class={len(SIZES)}", "dataset.split=[1,1,2]", *overrides)
    model = load_model(cfg.model, cfg)
    images = load_image_sets(cfg.dataset)
    return model, images, cfg


def test_timm_whole_image_equals_timm_evaluation_transform(jpeg_root):
    from timm.data import create_transform, resolve_data_config

    model, images, cfg = _view(jpeg_root, "resnet50", "patch=whole")
    assert (model.resize_size, model.interpolation) == (235, "bicubic")  # crop_pct 0.95 of the a2 recipe
    dataset = patch_dataset(model, images, patch_geometry(cfg.patch, model.input_size))
    transform = create_transform(**resolve_data_config({}, model=model.module), is_training=False)
    for item in range(len(dataset)):
        patches, index, boxes = dataset[item]
        expected = transform(load_rgb(images.source.paths[index]))
        assert patches.shape == (1, 3, 224, 224)
        assert torch.allclose(patches[0], expected, rtol=0, atol=TRANSFORM_TOL), \
            float((patches[0] - expected).abs().max())
        # The recorded box is the centre crop's region of the original image: 224/235 of its shorter side.
        width, height = Image.open(images.source.paths[index]).size
        x0, y0, x1, y1 = boxes[0].tolist()
        assert min(x1 - x0, y1 - y0) == pytest.approx(min(width, height) * 224 / 235, rel=1e-4)


def test_patches_are_resized_with_the_model_interpolation(jpeg_root):
    model, images, cfg = _view(jpeg_root, "test_vit")
    assert model.interpolation == "bicubic"
    dataset = patch_dataset(model, images, patch_geometry(cfg.patch, model.input_size), return_image=True)
    patches, image, _, _, _ = dataset[0]
    size = model.input_size
    box = dataset.patch_boxes[5]
    crop = image[:, box[1]:box[3], box[0]:box[2]][None]
    expected = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False)[0]
    assert torch.allclose(patches[5], expected, atol=RESIZE_TOL)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
def test_resize_matrices_equal_torch_interpolate(interpolation):
    rng = np.random.default_rng(0)
    for in_size, out_size in [(9, 32), (64, 224), (41, 160), (7, 7)]:
        x = torch.from_numpy(rng.normal(size=(2, 3, in_size, in_size)))
        matrix = resize_matrix(in_size, out_size, interpolation, torch.float64)
        extra = {} if interpolation == "nearest" else {"align_corners": False}
        expected = F.interpolate(x, size=(out_size, out_size), mode=interpolation, **extra)
        assert torch.allclose(matrix @ x @ matrix.T, expected, atol=1e-12)


def test_builtin_models_keep_their_stated_preprocessing(shared_dir):
    cfg = compose("extract", "model=cifar_resnet20")
    model = load_model(cfg.model, cfg)
    assert (model.input_size, model.resize_size, model.interpolation) == (32, 32, "bilinear")
    assert model.mean == (0.485, 0.456, 0.406)
