"""SyntheticSource: same interface as a folder, deterministic, varied, and learnable by a small CNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rsvc_cli.data.synthetic import SyntheticSource
from rsvc_cli.errors import RsvcError

# A small CNN trained for a few epochs must beat this on held-out images (chance is 1 / n_classes).
MIN_HELD_OUT_ACCURACY = 0.95
N_EPOCHS = 4
# Two images of one class must differ by at least this RMS (0-255 scale): varied, not copies.
MIN_WITHIN_CLASS_RMS = 10.0


def _pixels(source, index):
    return np.asarray(source.load_image(index), dtype=np.float64)


def test_interface():
    source = SyntheticSource(n_classes=3, images_per_class=5, image_size=24)
    assert len(source) == len(source.paths) == len(source.labels) == 15
    assert len(set(source.class_names)) == 3
    assert source.labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(source.labels), [5, 5, 5])
    assert source.paths[7] == f"synthetic/{source.class_names[1]}/2"
    image = source.load_image(7)
    assert image.mode == "RGB" and image.size == (24, 24)


def test_class_names_unique_for_many_classes():
    names = SyntheticSource(n_classes=40, images_per_class=1).class_names
    assert len(set(names)) == 40


@pytest.mark.parametrize("seed", [0, 3])
def test_images_depend_only_on_seed_class_and_index(seed):
    big = SyntheticSource(n_classes=4, images_per_class=10, seed=seed)
    small = SyntheticSource(n_classes=2, images_per_class=3, seed=seed)
    # Image 2 of class 1 exists in both settings and must be identical.
    np.testing.assert_array_equal(_pixels(big, 1 * 10 + 2), _pixels(small, 1 * 3 + 2))
    np.testing.assert_array_equal(_pixels(big, 5), _pixels(SyntheticSource(4, 10, seed=seed), 5))
    other_seed = SyntheticSource(n_classes=4, images_per_class=10, seed=seed + 1)
    assert not np.array_equal(_pixels(big, 5), _pixels(other_seed, 5))


def test_images_within_a_class_vary():
    source = SyntheticSource(n_classes=2, images_per_class=12)
    images = np.stack([_pixels(source, index) for index in range(12)]).reshape(12, -1)
    distances = np.sqrt(((images[:, None] - images[None]) ** 2).mean(axis=2))
    off_diagonal = distances[~np.eye(12, dtype=bool)]
    assert off_diagonal.min() > MIN_WITHIN_CLASS_RMS


def _tensor(source):
    images = np.stack([np.asarray(source.load_image(index)) for index in range(len(source))])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5, torch.from_numpy(source.labels)


@pytest.fixture
def one_thread():
    # Two cores shared by several people: one thread is faster than two fighting.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("seed", [0, 1])
def test_small_cnn_learns_classes_in_a_few_epochs(seed, one_thread):
    torch.manual_seed(seed)
    train_x, train_y = _tensor(SyntheticSource(n_classes=4, images_per_class=60, seed=seed))
    # Another seed is a disjoint "test split" with the same classes.
    test_x, test_y = _tensor(SyntheticSource(n_classes=4, images_per_class=25, seed=seed + 100))
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _epoch in range(N_EPOCHS):
        for batch in torch.randperm(len(train_x)).split(16):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    assert accuracy >= MIN_HELD_OUT_ACCURACY


@pytest.mark.parametrize(
    "kwargs", [{"n_classes": 0}, {"images_per_class": 0}, {"image_size": 4}, {"n_classes": 2.5},
               {"class_cues": ["colour"]}, {"class_cues": []}]
)
def test_invalid_parameters(kwargs):
    with pytest.raises(RsvcError) as info:
        SyntheticSource(**kwargs)
    assert "dataset." in info.value.fix


def test_class_cues_left_out_vary_per_image_and_the_rest_is_unchanged():
    full = SyntheticSource(n_classes=3, images_per_class=6)
    assert SyntheticSource(n_classes=3, images_per_class=6, class_cues=["hue", "shape", "stripes"]).class_names == \
        full.class_names
    np.testing.assert_array_equal(_pixels(full, 4), _pixels(SyntheticSource(3, 6, class_cues=["shape", "hue", "stripes"]), 4))
    stripes_only = SyntheticSource(n_classes=3, images_per_class=6, class_cues=["stripes"])
    assert all(name.startswith("stripes") for name in stripes_only.class_names)
    assert len(set(stripes_only.class_names)) == 3
    # With hue left out, one class's objects take many hues: the most saturated pixels of its
    # images (the object) differ in colour far more than a class with its own hue.
    def object_colours(source, label):
        colours = []
        for index in np.flatnonzero(source.labels == label):
            pixels = _pixels(source, index).reshape(-1, 3)
            saturation = pixels.max(1) - pixels.min(1)
            colours.append(pixels[saturation >= np.quantile(saturation, 0.95)].mean(0))
        return np.std(colours, axis=0).mean()

    assert object_colours(stripes_only, 0) > 3 * object_colours(full, 0)
