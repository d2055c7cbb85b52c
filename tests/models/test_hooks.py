"""Layer listing, layer names and one-pass recording on timm's tiny ResNet/ViT and the CIFAR nets.

Oracles: timm's own feature_info and patch grid for shapes; the raw output of a layer captured
by an independent hook for every reduction; the un-hooked model's logits.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from rsvc_cli.errors import RsvcError
from rsvc_cli.models.hooks import (
    LayerRecorder,
    describe_layers,
    list_layers,
    model_has_cls_token,
    reduce_to_vectors,
    resolve_layer_names,
)
from rsvc_cli.models.registry import make_model

# Recording must not change the numbers: same ops, same order.
EXACT = dict(rtol=0.0, atol=0.0)
# Means computed by us vs by the recorder (same float32 data, possibly another summation order).
MEAN_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
N_IMAGES = 3


def images_for(model, seed: int = 0) -> torch.Tensor:
    side = model.data_config.input_size
    return torch.randn(N_IMAGES, 3, side, side, generator=torch.Generator().manual_seed(seed))


def raw_outputs(module: nn.Module, layer_names: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The untouched outputs of some layers, captured by plain forward hooks (the oracle)."""
    captured, modules = {}, dict(module.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out.clone()))
        for name in layer_names
    ]
    try:
        with torch.no_grad():
            module(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@pytest.fixture(scope="module")
def test_resnet():
    torch.manual_seed(0)
    return make_model("test_resnet")


@pytest.fixture(scope="module")
def test_vit():
    torch.manual_seed(0)
    return make_model("test_vit")


class SharedActivationNet(nn.Module):
    """A module used twice per forward (like torchvision's BasicBlock.relu), one tuple output."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.split = SplitInTwo()
        self.unused = nn.Linear(4, 4)
        self.heads = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.bn(self.relu(self.conv2(x)))
        first, second = self.split(x.mean(dim=(2, 3)))
        return torch.cat([self.heads[0](first), self.heads[1](second)], dim=1)


class SplitInTwo(nn.Module):
    def forward(self, x):
        return x.chunk(2, dim=1)


# ------------------------------------------------------------------------------------------
# list_layers
# ------------------------------------------------------------------------------------------


def test_list_layers_resnet_stages_match_timm_feature_info(test_resnet):
    side = test_resnet.data_config.input_size
    shapes = dict(list_layers(test_resnet.module, side))
    for info in test_resnet.module.feature_info:
        expected = (info["num_chs"], side // info["reduction"], side // info["reduction"])
        assert shapes[info["module"]] == expected
    assert shapes["fc"] == (1000,)
    assert "" not in shapes


def test_list_layers_vit_blocks_are_token_sequences(test_vit):
    vit = test_vit.module
    shapes = dict(list_layers(vit, test_vit.data_config.input_size))
    n_tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    for index in range(len(vit.blocks)):
        assert shapes[f"blocks.{index}"] == (n_tokens, vit.embed_dim)
    assert shapes["head"] == (1000,)


def test_list_layers_keeps_modes_and_statistics():
    model = SharedActivationNet()
    model.train()
    model.heads[1].eval()
    running_mean = model.bn.running_mean.clone()
    names = [name for name, _ in list_layers(model, 8)]
    assert model.training and not model.heads[1].training and model.heads[0].training
    torch.testing.assert_close(model.bn.running_mean, running_mean, **EXACT)
    # Run twice (relu), never run (unused, the ModuleList), tuple output (split): not recordable.
    assert names == ["conv1", "conv2", "heads.0", "heads.1", "bn"]


# ------------------------------------------------------------------------------------------
# resolve_layer_names
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "wrong", "suggested"),
    [
        ("test_resnet", "layer5", "layer4"),
        ("test_vit", "block.3", "blocks.3"),
        ("test_vit", "blocks.3.mpl", "blocks.3.mlp"),
    ],
)
def test_unknown_layer_lists_suggestions(fixture, wrong, suggested, request):
    module = request.getfixturevalue(fixture).module
    with pytest.raises(RsvcError) as error:
        resolve_layer_names(module, ["layer1" if fixture == "test_resnet" else "blocks.0", wrong])
    assert repr(wrong) in error.value.problem
    assert suggested in error.value.problem
    assert "rsvc layers" in error.value.fix
    with pytest.raises(RsvcError):
        LayerRecorder(module, [wrong])


def test_resolve_layer_names_dedupes_and_accepts_a_string(test_resnet):
    assert resolve_layer_names(test_resnet.module, ["layer2", "layer1", "layer2"]) == ["layer2", "layer1"]
    assert resolve_layer_names(test_resnet.module, "layer3") == ["layer3"]


@pytest.mark.parametrize("name", ["heads", "relu", "split", "unused"])
def test_layers_of_the_wrong_kind(name):
    model = SharedActivationNet().eval()
    with pytest.raises(RsvcError) as error:
        resolve_layer_names(model, [name], input_size=8)
    assert "wrong kind" in error.value.problem
    if name != "heads":  # containers are refused without running the model
        resolve_layer_names(model, [name])
        with LayerRecorder(model, [name]) as recorder, pytest.raises(RsvcError) as error:
            recorder(torch.randn(2, 3, 8, 8))
        assert "wrong kind" in error.value.problem


# ------------------------------------------------------------------------------------------
# reduce_to_vectors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_reduce_to_vectors_by_shape(seed):
    generator = torch.Generator().manual_seed(seed)
    feature_map = torch.randn(4, 5, 6, 7, generator=generator)
    tokens = torch.randn(4, 9, 5, generator=generator)
    vectors = torch.randn(4, 5, generator=generator)
    torch.testing.assert_close(reduce_to_vectors(feature_map), feature_map.mean(dim=(2, 3)), **MEAN_TOLERANCE)
    torch.testing.assert_close(reduce_to_vectors(tokens, "cls", 1), tokens[:, 0], **EXACT)
    torch.testing.assert_close(reduce_to_vectors(tokens, "mean", 1), tokens[:, 1:].mean(dim=1), **MEAN_TOLERANCE)
    torch.testing.assert_close(reduce_to_vectors(tokens, "mean", 3), tokens[:, 3:].mean(dim=1), **MEAN_TOLERANCE)
    # No prefix token: "cls" falls back to the patch-token mean.
    torch.testing.assert_close(reduce_to_vectors(tokens, "cls", 0), tokens.mean(dim=1), **MEAN_TOLERANCE)
    torch.testing.assert_close(reduce_to_vectors(vectors), vectors, **EXACT)
    half = reduce_to_vectors(feature_map.half())
    assert half.dtype == torch.float32


@pytest.mark.parametrize(
    ("output", "token_reduce"),
    [
        ((torch.zeros(2, 3),), "cls"),  # a tuple
        (torch.zeros(2, 3, 4, 5, 6), "cls"),  # rank 5
        (torch.zeros(2), "cls"),  # rank 1
        (torch.zeros(2, 3), "max"),  # unknown reduction
    ],
)
def test_reduce_to_vectors_refuses(output, token_reduce):
    with pytest.raises(RsvcError):
        reduce_to_vectors(output, token_reduce)


# ------------------------------------------------------------------------------------------
# LayerRecorder
# ------------------------------------------------------------------------------------------


def test_recorder_resnet_shapes_and_unchanged_logits(test_resnet):
    module, images = test_resnet.module, images_for(test_resnet)
    layers = ["layer1", "layer4", "global_pool"]
    with torch.no_grad():
        expected_logits = module(images)
    raw = raw_outputs(module, layers, images)
    with LayerRecorder(module, layers) as recorder:
        logits, activations = recorder(images)
    torch.testing.assert_close(logits, expected_logits, **EXACT)
    assert list(activations) == layers
    for layer in layers:
        assert activations[layer].dtype == torch.float32
        assert activations[layer].shape == (N_IMAGES, raw[layer].shape[1])
    torch.testing.assert_close(activations["layer4"], raw["layer4"].mean(dim=(2, 3)), **MEAN_TOLERANCE)
    torch.testing.assert_close(activations["global_pool"], raw["global_pool"], **EXACT)


@pytest.mark.parametrize("block", [0, 3, 5])
def test_recorder_vit_cls_and_mean_match_raw_tokens(test_vit, block):
    vit, images = test_vit.module, images_for(test_vit, seed=block)
    name = f"blocks.{block}"
    tokens = raw_outputs(vit, [name], images)[name]
    assert model_has_cls_token(vit) and vit.num_prefix_tokens == 1
    with LayerRecorder(vit, [name], token_reduce="cls") as recorder:
        _, cls_vectors = recorder(images)
    with LayerRecorder(vit, [name], token_reduce="mean") as recorder:
        _, mean_vectors = recorder(images)
    assert cls_vectors[name].shape == mean_vectors[name].shape == (N_IMAGES, vit.embed_dim)
    torch.testing.assert_close(cls_vectors[name], tokens[:, 0], **EXACT)
    torch.testing.assert_close(mean_vectors[name], tokens[:, 1:].mean(dim=1), **MEAN_TOLERANCE)
    assert not torch.allclose(cls_vectors[name], mean_vectors[name])


@pytest.mark.parametrize(
    ("create_kwargs", "has_cls", "n_prefix"),
    [({"class_token": False, "global_pool": "avg"}, False, 0), ({"reg_tokens": 2}, True, 3)],
)
def test_recorder_vit_prefix_tokens_read_from_model(create_kwargs, has_cls, n_prefix):
    torch.manual_seed(0)
    model = make_model("test_vit", kwargs=create_kwargs)
    vit, images = model.module, images_for(model)
    assert model_has_cls_token(vit) == has_cls
    tokens = raw_outputs(vit, ["blocks.1"], images)["blocks.1"]
    with LayerRecorder(vit, ["blocks.1"], token_reduce="cls") as recorder:
        _, activations = recorder(images)
    expected = tokens[:, 0] if has_cls else tokens[:, n_prefix:].mean(dim=1)
    torch.testing.assert_close(activations["blocks.1"], expected, **MEAN_TOLERANCE)
    with LayerRecorder(vit, ["blocks.1"], token_reduce="mean") as recorder:
        _, activations = recorder(images)
    torch.testing.assert_close(activations["blocks.1"], tokens[:, n_prefix:].mean(dim=1), **MEAN_TOLERANCE)


def test_recorder_vit_patch_embedding_is_channels_last_patch_grid(test_vit):
    vit, images = test_vit.module, images_for(test_vit)
    grid = raw_outputs(vit, ["patch_embed"], images)["patch_embed"]
    with LayerRecorder(vit, ["patch_embed"]) as recorder:
        _, activations = recorder(images)
    # All positions are patches (no CLS yet); the embedding is the last axis.
    expected = grid.reshape(N_IMAGES, -1, vit.embed_dim).mean(dim=1)
    torch.testing.assert_close(activations["patch_embed"], expected, **MEAN_TOLERANCE)


def test_recorder_swin_stages_are_channels_last_and_its_convolution_is_not():
    """timm's Swin declares NHWC output: its stages and norm emit (n, h, w, c), its patch
    convolution (n, c, h, w). Each is averaged over its own spatial axes (h != w != c here, so a
    wrong guess would give vectors of another length or other values)."""
    import timm

    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=32,
                             patch_size=2, window_size=2, embed_dim=24, depths=(1, 1), num_heads=(1, 2)).eval()
    images = torch.randn(N_IMAGES, 3, 32, 32)
    layers = ["patch_embed.proj", "layers.0", "layers.1", "norm"]
    raw = raw_outputs(swin, layers, images)
    assert raw["layers.1"].shape == (N_IMAGES, 8, 8, 48) and raw["patch_embed.proj"].shape == (N_IMAGES, 24, 16, 16)
    with LayerRecorder(swin, layers) as recorder:
        _, activations = recorder(images)
    convolution = raw["patch_embed.proj"].mean(dim=(2, 3))
    torch.testing.assert_close(activations["patch_embed.proj"], convolution, **MEAN_TOLERANCE)
    for name in ("layers.0", "layers.1", "norm"):
        torch.testing.assert_close(activations[name], raw[name].mean(dim=(1, 2)), **MEAN_TOLERANCE)


@pytest.mark.parametrize("name", ["cifar_resnet20", "tiniest"])
def test_recorder_cifar_blocks_match_raw_maps(name):
    torch.manual_seed(0)
    model = make_model(name)
    layers = ["layer1", "layer2.0", "layer3"] if name == "cifar_resnet20" else ["l1", "l3", "l6"]
    images = images_for(model)
    raw = raw_outputs(model.module, layers, images)
    with LayerRecorder(model.module, layers) as recorder:
        _, activations = recorder(images)
    for layer in layers:
        torch.testing.assert_close(activations[layer], raw[layer].mean(dim=(2, 3)), **MEAN_TOLERANCE)


def test_recorder_removes_its_hooks(test_resnet):
    module = test_resnet.module
    recorder = LayerRecorder(module, ["layer1", "layer2"])
    assert any(len(m._forward_hooks) for m in module.modules())
    recorder.close()
    assert not any(len(m._forward_hooks) for m in module.modules())
    with LayerRecorder(module, ["layer3"]):
        pass
    assert not any(len(m._forward_hooks) for m in module.modules())
    with pytest.raises(RuntimeError):
        recorder(images_for(test_resnet))


def test_recorder_runs_once_per_call(test_resnet):
    module, images = test_resnet.module, images_for(test_resnet)
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    try:
        with LayerRecorder(module, ["layer1", "layer2", "layer3", "layer4"]) as recorder:
            first = recorder(images)[1]
            second = recorder(images[:1])[1]
    finally:
        handle.remove()
    assert len(calls) == 2
    assert first["layer2"].shape[0] == N_IMAGES and second["layer2"].shape[0] == 1
    torch.testing.assert_close(second["layer2"], first["layer2"][:1], **MEAN_TOLERANCE)


def test_unknown_token_reduce(test_vit):
    with pytest.raises(RsvcError) as error:
        LayerRecorder(test_vit.module, ["blocks.0"], token_reduce="max")
    assert "cls" in error.value.fix and "mean" in error.value.fix



def test_recorder_stop_early_records_the_same_and_skips_the_rest(test_vit):
    vit, images = test_vit.module, images_for(test_vit, seed=4)
    layers = ["blocks.1", "blocks.0"]  # any order: the pass ends once both are recorded
    later_blocks = []
    handle = vit.blocks[2].register_forward_hook(lambda *_: later_blocks.append(1))
    try:
        with LayerRecorder(vit, layers) as recorder:
            logits, full = recorder(images)
            stopped_logits, stopped = recorder(images, stop_early=True)
            assert len(later_blocks) == 1  # the full pass ran blocks.2, the stopped one did not
            again, _ = recorder(images)  # a stopped pass leaves the recorder as it was
    finally:
        handle.remove()
    assert stopped_logits is None and logits is not None
    torch.testing.assert_close(again, logits, **EXACT)
    for layer in layers:
        torch.testing.assert_close(stopped[layer], full[layer], **EXACT)




# ------------------------------------------------------------------------------------------
# Which layers are understood (describe_layers)
# ------------------------------------------------------------------------------------------


def test_attention_internals_are_refused_with_their_shape_and_the_nearest_layers(test_vit):
    """q_norm's output is batch x heads x tokens x head-dim: averaging its last two axes gave one
    "feature" per head. Refused, naming the shape and where to record instead."""
    vit = test_vit.module
    side = test_vit.data_config.input_size
    n_tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    heads = vit.blocks[0].attn.num_heads
    with pytest.raises(RsvcError) as error:
        resolve_layer_names(vit, ["blocks.0.attn.q_norm"], input_size=side)
    shape = f"batch x {heads} x {n_tokens} x {vit.embed_dim // heads}"
    assert shape in error.value.problem and "wrong kind" in error.value.problem
    assert "nearest recordable layers: blocks.0.attn," in error.value.problem
    described = {info.name: info for info in describe_layers(vit, side)}
    assert not described["blocks.0.attn.q_norm"].recordable and described["blocks.0.attn.q_norm"].output == shape
    assert described["blocks.0.attn"].kind == described["norm"].kind == "token sequence"
    assert described["patch_embed.proj"].kind == "feature map"
    # Inside timm's NHWC patch embedding, its norm is a channels-last map like the embedding itself.
    assert described["patch_embed.norm"].kind == described["patch_embed"].kind == "channels-last map"


def test_every_module_is_listed_with_why_it_cannot_be_recorded():
    model = SharedActivationNet().eval()
    described = {info.name: info for info in describe_layers(model, 8)}
    assert set(described) == {name for name, _ in model.named_modules() if name}
    assert described["split"].reason == "outputs a tuple of 2 values, not one tensor"
    assert described["split"].output == "tuple of 2 (2, 2)"
    assert described["relu"].reason == "runs 2 times per forward pass"
    assert described["unused"].reason == "does not run in a forward pass"
    assert described["heads"].reason == "is a module container that never runs itself"
    assert described["bn"].kind == "feature map" and described["heads.0"].kind == "vector"


@pytest.mark.parametrize("token_reduce", ["cls", "mean"])
def test_the_final_norm_of_a_vit_is_recordable(test_vit, token_reduce):
    """The paper's ViT layer: the CLS token after the final norm, i.e. forward_features(x)[:, 0]."""
    vit = test_vit.module
    images = images_for(test_vit)
    with LayerRecorder(vit, resolve_layer_names(vit, ["norm"], input_size=images.shape[-1]),
                       token_reduce=token_reduce) as recorder:
        _, vectors = recorder(images)
    with torch.no_grad():
        tokens = vit.forward_features(images)
    expected = tokens[:, 0] if token_reduce == "cls" else tokens[:, vit.num_prefix_tokens:].mean(dim=1)
    torch.testing.assert_close(vectors["norm"], expected, **MEAN_TOLERANCE)
