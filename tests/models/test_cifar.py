"""The CIFAR-10 architectures against the shared third-party weights and the README's facts.

Oracles: a strict load of the real checkpoints; the README's accuracy table on the real JPEG test
set; the SHA-256 prefix torch.hub puts in the ResNet file names; the README's layer shapes and
signs; and the classifier head applied to a recorded layer reproducing the logits.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsvc_cli.models.hooks import LayerRecorder, list_layers
from rsvc_cli.models.loading import DataConfig, file_digest
from rsvc_cli.models.registry import make_model

# The same place tests/conftest.py's `shared_dir` fixture checks (it fails when it is missing).
SHARED_DIR = Path(__file__).resolve().parents[3] / "shared"
WEIGHTS_DIR = SHARED_DIR / "models" / "cifar10"
TEST_DIR = SHARED_DIR / "data" / "cifar10" / "test"

# (model name, weights file, accuracy in % on the JPEG test set from the README table)
CIFAR_MODELS = [
    ("cifar_resnet20", "resnet20-12fca82f.th", 81.0),
    ("cifar_resnet56", "resnet56-4bfd9763.th", 83.2),
    ("tiniest", "tiniest.pt", 86.6),
]
# The README rounds to 0.1 point; the full test set must land within 1 point of it.
ACCURACY_TOLERANCE_FULL = 1.0
# 500 images (50 per class): a binomial standard error of about 1.7 points; 6 points is ~3.5 sigma.
ACCURACY_TOLERANCE_SUBSET = 6.0
SUBSET_PER_CLASS = 50
BATCH_SIZE = 500
LOGIT_TOLERANCE = 1e-4


def load_test_images(per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 32, 32, 3) images and int labels, classes in sorted folder order."""
    class_dirs = sorted(path for path in TEST_DIR.iterdir() if path.is_dir())
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(class_dir.glob("*.jpg"))[:per_class]
        paths += files
        labels += [label] * len(files)
    images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])
    return images, np.asarray(labels)


def to_model_input(images: np.ndarray, data_config: DataConfig) -> torch.Tensor:
    """x/255, then normalize with the model's mean/std: (n, 3, h, w) float32."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(data_config.mean).view(1, 3, 1, 1)
    std = torch.tensor(data_config.std).view(1, 3, 1, 1)
    return (pixels - mean) / std


def accuracy_percent(model, images: np.ndarray, labels: np.ndarray) -> float:
    inputs = to_model_input(images, model.data_config)
    with torch.inference_mode():
        batches = inputs.split(BATCH_SIZE)
        predictions = torch.cat([model.module(batch).argmax(dim=1) for batch in batches])
    return 100.0 * float((predictions.numpy() == labels).mean())


@pytest.fixture(scope="module")
def full_test_set():
    return load_test_images()


@pytest.fixture(scope="module")
def test_subset():
    return load_test_images(per_class=SUBSET_PER_CLASS)


@pytest.mark.parametrize(("name", "weights", "expected"), CIFAR_MODELS)
def test_shared_checkpoint_loads_strictly(shared_dir, name, weights, expected):
    model = make_model(name, checkpoint=str(WEIGHTS_DIR / weights))
    assert not model.module.training
    assert model.num_classes == 10
    assert model.data_config.input_size == 32
    # Every parameter and buffer comes from the file: compare against the raw checkpoint.
    raw = torch.load(WEIGHTS_DIR / weights, map_location="cpu", weights_only=True)
    raw = raw.get("state_dict", raw)
    raw = {key.removeprefix("module."): value for key, value in raw.items()}
    loaded = model.module.state_dict()
    assert set(raw) == {key for key in loaded if not key.endswith("num_batches_tracked")}
    for key, value in raw.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "weights", "expected"), CIFAR_MODELS)
def test_checkpoint_digest_is_file_sha256(shared_dir, name, weights, expected):
    model = make_model(name, checkpoint=str(WEIGHTS_DIR / weights))
    digest = hashlib.sha256((WEIGHTS_DIR / weights).read_bytes()).hexdigest()
    assert model.checkpoint_digest == digest
    tag = weights.split("-")[-1].split(".")[0] if "-" in weights else None
    if tag is not None:  # torch.hub names files by the first hex digits of their SHA-256
        assert digest.startswith(tag)


def test_digest_cache_follows_file_changes(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"first")
    first = file_digest(path)
    assert first == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"second!")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert file_digest(path) == hashlib.sha256(b"second!").hexdigest()


@pytest.mark.parametrize(("name", "weights", "expected"), CIFAR_MODELS)
def test_accuracy_on_test_subset(shared_dir, test_subset, name, weights, expected):
    images, labels = test_subset
    model = make_model(name, checkpoint=str(WEIGHTS_DIR / weights))
    assert abs(accuracy_percent(model, images, labels) - expected) <= ACCURACY_TOLERANCE_SUBSET


@pytest.mark.slow
@pytest.mark.parametrize(("name", "weights", "expected"), CIFAR_MODELS)
def test_accuracy_on_full_test_set_matches_readme(shared_dir, full_test_set, name, weights, expected):
    images, labels = full_test_set
    assert len(labels) == 10_000
    model = make_model(name, checkpoint=str(WEIGHTS_DIR / weights))
    assert abs(accuracy_percent(model, images, labels) - expected) <= ACCURACY_TOLERANCE_FULL


@pytest.mark.parametrize(
    ("name", "expected_shapes"),
    [
        ("cifar_resnet20", {"layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8)}),
        ("cifar_resnet56", {"layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8)}),
        ("tiniest", {**{f"l{i}": (48, 32, 32) for i in (1, 2, 3)}, **{f"l{i}": (80, 16, 16) for i in (4, 5, 6)}}),
    ],
)
def test_concept_layers_have_readme_shapes(name, expected_shapes):
    model = make_model(name)
    shapes = dict(list_layers(model.module, model.data_config.input_size))
    assert {layer: shapes[layer] for layer in expected_shapes} == expected_shapes


@pytest.mark.parametrize(("name", "weights", "expected"), CIFAR_MODELS)
def test_last_layer_vectors_reproduce_logits(shared_dir, test_subset, name, weights, expected):
    """The recorded last layer is the map the head pools: head(spatial mean) == logits."""
    images, _ = test_subset
    model = make_model(name, checkpoint=str(WEIGHTS_DIR / weights))
    is_resnet = name.startswith("cifar_resnet")
    layers = ["layer1", "layer2", "layer3"] if is_resnet else [f"l{i}" for i in range(1, 7)]
    head = model.module.linear if is_resnet else model.module.fc
    with LayerRecorder(model.module, layers) as recorder:
        logits, activations = recorder(to_model_input(images[::10], model.data_config))
    with torch.no_grad():
        torch.testing.assert_close(head(activations[layers[-1]]), logits, rtol=0, atol=LOGIT_TOLERANCE)
    if is_resnet:  # README: all three stage outputs are post-ReLU
        assert all(bool((activations[layer] >= 0).all()) for layer in layers)
    else:  # README: about half of Tiniest's pooled activations are negative
        negative_fraction = float((activations["l6"] < 0).float().mean())
        assert 0.2 < negative_fraction < 0.8


@pytest.mark.parametrize("name", ["cifar_resnet20", "tiniest"])
def test_gradients_flow_to_the_input(name):
    """Concept importance back-propagates through these nets: no in-place op may break autograd."""
    model = make_model(name)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    model.module(images)[:, 3].sum().backward()
    assert images.grad is not None and bool(images.grad.abs().sum() > 0)
