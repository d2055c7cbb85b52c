"""Replacing one layer's output and running the rest of the network (rsvc_cli.models.intervention)."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from torch import nn

from rsvc_cli.errors import RsvcError
from rsvc_cli.models.intervention import (
    capture_layer_output,
    find_layer,
    make_concept_head,
    run_with_layer_output,
    to_positions,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Rebuilding a layer output as U W + (A - U W) differs from A by float32 rounding only.
REBUILD_ATOL = 1e-4
IMAGE_SIZE = 48  # timm's test models accept any size (test_vit when created with it); small is fast


class SkipNet(nn.Module):
    """A block whose shortcut reads a tensor from *before* the replaced layer, plus odd layers.

    ``body`` is replaced in the tests: the shortcut still needs the prefix, which is why the
    intervention runs the whole forward pass. ``pair`` returns a tuple, ``shared`` runs twice,
    ``unused`` never runs.
    """

    def __init__(self, channels: int = 6, n_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Tanh())
        self.shared = nn.Tanh()
        self.pair = PairModule()
        self.unused = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(channels, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        stem = self.stem(images)
        mixed = self.shared(self.body(stem) + stem)
        first, second = self.pair(mixed)
        mixed = self.shared(first + second)
        return self.fc(self.dropout(self.flatten(self.pool(mixed))))


class PairModule(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, 0.5 * x


@pytest.fixture(scope="module")
def test_resnet() -> nn.Module:
    return timm.create_model("test_resnet").eval()


@pytest.fixture(scope="module")
def test_vit() -> nn.Module:
    return timm.create_model("test_vit", img_size=IMAGE_SIZE).eval()


@pytest.fixture(scope="module")
def skip_net() -> nn.Module:
    torch.manual_seed(0)
    return SkipNet().eval()


def images_for(n: int = 3, seed: int = 0, size: int = IMAGE_SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "model_name, layer_name",
    [
        ("test_resnet", "layer2"),  # (n, c, h, w) map
        ("test_resnet", "layer4.0"),
        ("test_resnet", "global_pool"),  # pooled (n, d)
        ("test_vit", "blocks.0"),  # (n, t, d) tokens
        ("test_vit", "patch_embed"),  # channels-last (n, h, w, d) map
        ("test_vit", "fc_norm"),
        ("skip_net", "body"),  # the shortcut around it reads the prefix
    ],
)
def test_replacing_with_the_captured_output_reproduces_the_logits_exactly(request, model_name, layer_name):
    model = request.getfixturevalue(model_name)
    images = images_for()
    with torch.no_grad():
        expected = model(images)
    captured = capture_layer_output(model, layer_name, images)
    assert torch.equal(run_with_layer_output(model, layer_name, images, captured), expected)
    # And the replacement really is used: a different output gives different logits.
    changed = run_with_layer_output(model, layer_name, images, captured * 1.5 + 0.1)
    assert not torch.allclose(changed, expected)


def test_in_place_operations_after_the_layer_touch_neither_capture_nor_replacement():
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    images = images_for()
    with torch.no_grad():
        expected = model(images)
    captured = capture_layer_output(model, "1", images)
    assert (captured < 0).any()  # recorded before the in-place ReLU ran
    kept = captured.clone()
    assert torch.equal(run_with_layer_output(model, "1", images, captured), expected)
    assert torch.equal(captured, kept)


def _map_rows_by_indexing(output: torch.Tensor) -> torch.Tensor:
    """Oracle for (n, c, h, w): row p of image i is output[i, :, y, x] with p = y * w + x."""
    n_samples, channels, height, width = output.shape
    positions = [(y, x) for y in range(height) for x in range(width)]
    return torch.stack([torch.stack([output[i, :, y, x] for y, x in positions]) for i in range(n_samples)])


@pytest.mark.parametrize("seed", [0, 1])
def test_to_positions_of_a_feature_map_matches_indexing_and_round_trips(seed):
    output = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(seed))
    rows, restore = to_positions(output, n_features=5)
    assert rows.shape == (2, 12, 5)
    assert torch.equal(rows, _map_rows_by_indexing(output))
    assert torch.equal(restore(rows), output)
    # Stacked copies (how integration steps and concepts are batched) restore copy by copy.
    assert torch.equal(restore(torch.cat([rows, 2 * rows])), torch.cat([output, 2 * output]))


@pytest.mark.parametrize(
    "shape, n_features, n_positions",
    [
        ((3, 7), 7, 1),  # pooled
        ((3, 11, 7), 7, 11),  # tokens: features last
        ((3, 7, 11), 7, 11),  # a 1-d channels-first sequence, recognized by n_features
        ((3, 4, 5, 7), 7, 20),  # channels-last map, recognized by n_features
        ((3, 7, 4, 5), None, 20),  # channels-first map by default
        ((3, 11, 7), None, 11),  # tokens by default
    ],
)
def test_to_positions_round_trips_every_layout(shape, n_features, n_positions):
    output = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    rows, restore = to_positions(output, n_features=n_features)
    assert rows.shape == (3, n_positions, n_features or rows.shape[-1])
    assert torch.equal(restore(rows), output)


def test_to_positions_keeps_gradients():
    rows = torch.randn(2, 6, 4, requires_grad=True)
    _, restore = to_positions(torch.zeros(2, 4, 2, 3), n_features=4)
    restore(rows).square().sum().backward()
    assert torch.allclose(rows.grad, 2 * rows.detach())


@pytest.mark.parametrize("channels_last, feature_axis", [(True, 3), (False, 1)])
def test_to_positions_follows_a_declared_layout(channels_last, feature_axis):
    output = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))  # ambiguous by shape
    rows, restore = to_positions(output, n_features=4, channels_last=channels_last)
    assert torch.equal(rows[:, 5], output.movedim(feature_axis, -1)[:, 1, 1])  # position 5 = (y 1, x 1)
    assert torch.equal(restore(rows), output)


@pytest.mark.parametrize("shape", [(3, 6, 4, 4), (3, 10, 6), (3, 9)])
def test_to_positions_refuses_a_basis_of_the_wrong_width(shape):
    with pytest.raises(RsvcError, match="8 features"):
        to_positions(torch.zeros(shape), n_features=8)


def test_to_positions_refuses_an_output_without_features():
    with pytest.raises(RsvcError, match="layout"):
        to_positions(torch.zeros(5))


@pytest.mark.parametrize(
    "layer_name, message",
    [
        ("pair", "returns a tuple"),
        ("shared", "more than once"),
        ("unused", "never ran"),
        ("bodyy", "'bodyy' \\(closest: body"),
        ("", "Unknown layer"),
    ],
)
def test_impossible_layers_are_clear_errors(skip_net, layer_name, message):
    images = images_for()
    with pytest.raises(RsvcError, match=message):
        capture_layer_output(skip_net, layer_name, images)
    with pytest.raises(RsvcError, match=message):
        run_with_layer_output(skip_net, layer_name, images, torch.zeros(3, 6, IMAGE_SIZE, IMAGE_SIZE))


def test_a_replacement_of_the_wrong_shape_is_a_clear_error(skip_net):
    images = images_for()
    with pytest.raises(RsvcError, match=r"shape \(2, 6, 48, 48\).*outputs \(3, 6, 48, 48\)"):
        run_with_layer_output(skip_net, "body", images, torch.zeros(2, 6, IMAGE_SIZE, IMAGE_SIZE))


def test_find_layer_returns_the_module(test_resnet):
    assert find_layer(test_resnet, "layer2.0") is test_resnet.layer2[0]


@pytest.mark.parametrize(("model_name", "layer_name"), [("test_resnet", "layer3"), ("test_vit", "blocks.1")])
def test_a_concept_head_with_the_residual_reproduces_the_logits(request, model_name, layer_name):
    model = request.getfixturevalue(model_name)
    images = images_for(n=2, seed=3)
    with torch.no_grad():
        expected = model(images).double()
    rows, restore = to_positions(capture_layer_output(model, layer_name, images))
    generator = torch.Generator().manual_seed(0)
    concept_basis = torch.randn(4, rows.shape[-1], generator=generator, dtype=torch.float64)
    coefficients = torch.rand(*rows.shape[:2], 4, generator=generator, dtype=torch.float64)
    residual = rows.double() - coefficients @ concept_basis
    head = make_concept_head(model, layer_name, images, concept_basis, restore, residual=residual)
    assert torch.allclose(head(coefficients).double(), expected, atol=REBUILD_ATOL)
    # r stacked copies of the rows give r copies of the logits (images tiled to match).
    stacked = head(torch.cat([coefficients, coefficients, coefficients])).double()
    assert torch.allclose(stacked, expected.repeat(3, 1), atol=REBUILD_ATOL)
    with pytest.raises(ValueError, match="multiple"):
        head(coefficients[:1])


def test_a_concept_head_outputs_log_probabilities_on_request(skip_net):
    images = images_for()
    rows, restore = to_positions(capture_layer_output(skip_net, "body", images))
    concept_basis = torch.rand(3, rows.shape[-1], generator=torch.Generator().manual_seed(1))
    coefficients = torch.rand(*rows.shape[:2], 3, generator=torch.Generator().manual_seed(2))
    logits = make_concept_head(skip_net, "body", images, concept_basis, restore)(coefficients)
    log_probabilities = make_concept_head(
        skip_net, "body", images, concept_basis, restore, output="log_probabilities"
    )(coefficients)
    assert torch.allclose(log_probabilities, torch.log_softmax(logits, dim=-1))


def test_gradients_reach_the_coefficients_and_leave_the_model_untouched():
    """gradcheck through the hook (float64 net, smooth activations), then the model's state."""
    torch.manual_seed(0)
    model = SkipNet().double().train()  # training mode on purpose: the head must use eval
    images = images_for(n=2, size=4).double()
    rows, restore = to_positions(capture_layer_output(model, "body", images))
    concept_basis = torch.rand(3, rows.shape[-1], dtype=torch.float64)
    head = make_concept_head(model, "body", images, concept_basis, restore)
    coefficients = torch.rand(*rows.shape[:2], 3, dtype=torch.float64, requires_grad=True)
    # Deterministic despite the dropout module: the head runs in eval mode.
    assert torch.equal(head(coefficients), head(coefficients))
    assert torch.autograd.gradcheck(head, (coefficients,), fast_mode=True)
    assert all(parameter.grad is None and parameter.requires_grad for parameter in model.parameters())
    assert all(module.training for module in model.modules())


def test_capture_returns_a_tensor_without_a_graph(test_resnet):
    output = capture_layer_output(test_resnet, "layer1", images_for())
    assert output.shape == (3, 32, 12, 12)
    assert output.grad_fn is None and not output.requires_grad
