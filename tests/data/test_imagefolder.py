"""ImageFolderSource: layout, ordering, image modes, and every user error it promises."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsvc_cli.data.imagefolder import IMAGE_EXTENSIONS, ImageFolderSource
from rsvc_cli.errors import RsvcError

SHARED_DIR = Path(__file__).resolve().parents[2].parent / "shared"
RNG_SEED = 0


def _random_rgb(size=(12, 10), seed=RNG_SEED):
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture
def tree(tmp_path):
    """cat/ dog/ bird/ with one image per format and colour mode, plus litter to ignore."""
    root = tmp_path / "images"
    for name in ("cat", "dog", "bird"):
        (root / name).mkdir(parents=True)
    Image.fromarray(_random_rgb()).save(root / "cat" / "b.JPG")
    Image.fromarray(_random_rgb()[:, :, 0]).save(root / "cat" / "a_grey.png")
    Image.fromarray(_random_rgb()).convert("P").save(root / "cat" / "c_palette.gif")
    rgba = np.concatenate([_random_rgb(), np.full((10, 12, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(root / "dog" / "rgba.png")
    Image.fromarray(_random_rgb()).save(root / "dog" / "x.bmp")
    Image.fromarray(_random_rgb()).save(root / "dog" / "y.tiff")
    Image.fromarray(_random_rgb()).save(root / "bird" / "z.webp")
    (root / "bird" / "nested").mkdir()
    Image.fromarray(_random_rgb()).save(root / "bird" / "nested" / "deep.jpeg")
    (root / "bird" / "notes.txt").write_text("not an image")
    (root / "bird" / ".hidden.jpg").write_bytes(b"")
    (root / ".ipynb_checkpoints").mkdir()
    return root


def test_layout_ordering_and_labels(tree):
    source = ImageFolderSource(tree)
    assert source.class_names == ["bird", "cat", "dog"]
    relative = [os.path.relpath(path, tree) for path in source.paths]
    assert relative == [
        "bird/nested/deep.jpeg", "bird/z.webp",
        "cat/a_grey.png", "cat/b.JPG", "cat/c_palette.gif",
        "dog/rgba.png", "dog/x.bmp", "dog/y.tiff",
    ]
    assert source.labels.dtype == np.int64
    assert [source.class_names[label] for label in source.labels] == [path.split("/")[0] for path in relative]
    assert len(source) == len(source.paths)
    # Deterministic: a second scan gives the same order.
    assert ImageFolderSource(tree).paths == source.paths


def test_every_mode_loads_as_rgb(tree):
    source = ImageFolderSource(tree)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns on palette-with-transparency misuse
        for index in range(len(source)):
            image = source.load_image(index)
            assert image.mode == "RGB" and image.size == (12, 10)


def test_rgba_keeps_colour_and_grey_is_replicated(tree):
    source = ImageFolderSource(tree)
    by_name = {os.path.basename(path): index for index, path in enumerate(source.paths)}
    rgba = np.asarray(source.load_image(by_name["rgba.png"]))
    np.testing.assert_array_equal(rgba, _random_rgb())
    grey = np.asarray(source.load_image(by_name["a_grey.png"]))
    np.testing.assert_array_equal(grey, np.repeat(_random_rgb()[:, :, :1], 3, axis=2))


def test_palette_with_transparency_and_16_bit(tmp_path):
    root = tmp_path / "r"
    (root / "a").mkdir(parents=True)
    palette = Image.fromarray(_random_rgb()).convert("P")
    palette.info["transparency"] = 0
    palette.save(root / "a" / "p.png", transparency=0)
    wide = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(wide).save(root / "a" / "w.png")
    source = ImageFolderSource(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert source.load_image(0).mode == "RGB"
    assert Image.open(source.paths[1]).mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(source.load_image(1))[0, :, 0], np.rint(wide[0] / 65535 * 255))


def test_requested_classes_keep_their_order(tree):
    source = ImageFolderSource(tree, classes=["dog", "bird"])
    assert source.class_names == ["dog", "bird"]
    assert np.bincount(source.labels).tolist() == [3, 2]
    assert all(os.path.relpath(path, tree).startswith("dog") for path in source.paths[:3])


def test_extensions_are_case_insensitive(tmp_path):
    root = tmp_path / "r"
    (root / "a").mkdir(parents=True)
    for index, extension in enumerate(IMAGE_EXTENSIONS):
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(extension)
        Image.fromarray(_random_rgb()).save(root / "a" / f"{index}{extension.upper()}", format=fmt)
    assert len(ImageFolderSource(root)) == len(IMAGE_EXTENSIONS)


def _error(callable_, *args, **kwargs) -> RsvcError:
    with pytest.raises(RsvcError) as info:
        callable_(*args, **kwargs)
    assert info.value.problem and info.value.fix
    return info.value


def test_missing_root(tmp_path):
    error = _error(ImageFolderSource, tmp_path / "nowhere")
    assert "does not exist" in error.problem and "dataset.root" in error.fix


def test_root_without_class_folders(tmp_path):
    Image.fromarray(_random_rgb()).save(tmp_path / "loose.png")
    error = _error(ImageFolderSource, tmp_path)
    assert "no class folders" in error.problem and "1 loose images" in error.problem


def test_unknown_class_lists_close_matches(tree):
    error = _error(ImageFolderSource, tree, classes=["dgo"])
    assert "'dgo'" in error.problem and "dog" in error.problem


def test_empty_class_folder(tree):
    (tree / "empty").mkdir()
    error = _error(ImageFolderSource, tree)
    assert "empty" in error.problem and "no images" in error.problem


@pytest.mark.parametrize("content", [b"", b"definitely not a jpeg", "truncated"])
def test_unreadable_image_named_when_loaded(tree, content):
    path = tree / "cat" / "broken.jpg"
    if content == "truncated":
        Image.fromarray(_random_rgb((64, 64))).save(path, quality=95)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    source = ImageFolderSource(tree)  # scanning does not open images
    error = _error(source.load_image, source.paths.index(str(path)))
    assert str(path) in error.problem


def test_real_cifar10_subset():
    root = SHARED_DIR / "data" / "cifar10" / "test"
    assert root.is_dir(), f"shared data missing at {root}"
    source = ImageFolderSource(root, classes=["ship", "cat"])
    assert source.class_names == ["ship", "cat"]
    assert np.bincount(source.labels).tolist() == [1000, 1000]
    image = source.load_image(1500)
    assert image.mode == "RGB" and image.size == (32, 32)
