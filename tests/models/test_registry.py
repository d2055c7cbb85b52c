"""make_model: built-ins, timm names, import paths, checkpoint formats and the user errors."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from rsvc_cli.errors import RsvcError
from rsvc_cli.models.loading import DataConfig
from rsvc_cli.models.registry import list_builtin_models, make_model

WEIGHTS_DIR = Path(__file__).resolve().parents[3] / "shared" / "models" / "cifar10"
RESNET20_WEIGHTS = WEIGHTS_DIR / "resnet20-12fca82f.th"
# An offline pretrained request must fail at once, not after network timeouts.
OFFLINE_FAILURE_SECONDS = 10.0
OUTPUT_TOLERANCE = 1e-6

TINY_MODULE_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TinyNet(nn.Module):
        def __init__(self, width=4, n_outputs=3):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(width, n_outputs)

        def forward(self, x):
            return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


    def make_tiny_net(width=4):
        return TinyNet(width=width)
    """
)


@pytest.fixture
def tiny_module_on_path(tmp_path, monkeypatch):
    """A user's own model file, importable as `tiny_custom_net`."""
    (tmp_path / "tiny_custom_net.py").write_text(TINY_MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def outputs_of(module: torch.nn.Module, side: int, seed: int = 0) -> torch.Tensor:
    images = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return module.eval()(images)


def test_builtin_names_listed():
    assert list_builtin_models() == ["cifar_resnet20", "cifar_resnet56", "tiniest"]


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_resnet56", "tiniest"])
def test_builtin_models_carry_their_preprocessing(name):
    model = make_model(name)
    assert model.name == name
    assert model.checkpoint_digest is None
    assert not any(module.training for module in model.module.modules())
    assert model.data_config.input_size == 32
    if name == "tiniest":  # x/255 - 0.5
        assert model.data_config.mean == (0.5, 0.5, 0.5) and model.data_config.std == (1.0, 1.0, 1.0)
    else:  # ImageNet statistics on x/255
        assert model.data_config.mean == (0.485, 0.456, 0.406)
        assert model.data_config.std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_resnet.r160_in1k"])
def test_timm_models_use_timm_preprocessing(name):
    model = make_model(name)
    resolved = timm.data.resolve_model_data_config(model.module)
    assert model.data_config == DataConfig(
        input_size=resolved["input_size"][-1],
        mean=tuple(resolved["mean"]),
        std=tuple(resolved["std"]),
        interpolation=resolved["interpolation"],
        crop_pct=resolved["crop_pct"],
        crop_mode=resolved["crop_mode"],
    )
    assert not model.module.training
    assert model.num_classes == 1000


@pytest.mark.parametrize("num_classes", [3, 7])
def test_num_classes_reaches_the_head(num_classes):
    for name in ("test_resnet", "cifar_resnet20"):
        model = make_model(name, num_classes=num_classes)
        assert model.num_classes == num_classes
        assert outputs_of(model.module, model.data_config.input_size).shape == (2, num_classes)


@pytest.mark.parametrize(
    ("name", "expected_suggestion"),
    [("cifar_resnet21", "cifar_resnet20"), ("test_vitt", "test_vit"), ("resnet_18", "resnet18")],
)
def test_unknown_model_lists_close_matches(name, expected_suggestion):
    with pytest.raises(RsvcError) as error:
        make_model(name)
    assert name in error.value.problem
    assert expected_suggestion in error.value.problem
    assert "model.name" in error.value.fix


def test_unknown_pretrained_tag_lists_existing_tags():
    with pytest.raises(RsvcError) as error:
        make_model("resnet18.not_a_tag")
    assert "resnet18.a1_in1k" in error.value.fix


@pytest.mark.parametrize(
    "name",
    [
        "test_resnet",  # weights on the Hugging Face Hub
        "legacy_seresnet18",  # weights behind a plain URL (torch.hub)
    ],
)
def test_pretrained_offline_fails_fast_with_fix(name, tmp_path, monkeypatch):
    from huggingface_hub import constants as hub_constants

    # Empty caches, offline: nothing can be found, nothing may be fetched.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))
    started = time.monotonic()
    with pytest.raises(RsvcError) as error:
        make_model(name, pretrained=True)
    assert time.monotonic() - started < OFFLINE_FAILURE_SECONDS
    assert "model.checkpoint=PATH" in error.value.fix


def test_builtin_pretrained_without_checkpoint_names_the_fix():
    with pytest.raises(RsvcError) as error:
        make_model("cifar_resnet20", pretrained=True)
    assert "model.checkpoint=PATH" in error.value.fix


def test_pretrained_with_checkpoint_uses_the_file(shared_dir):
    # No download is attempted: the checkpoint is the source of the weights.
    model = make_model("cifar_resnet20", pretrained=True, checkpoint=str(RESNET20_WEIGHTS))
    assert model.checkpoint_digest is not None


def test_checkpoint_of_another_architecture_is_refused(shared_dir):
    with pytest.raises(RsvcError) as error:
        make_model("cifar_resnet56", checkpoint=str(RESNET20_WEIGHTS))
    assert "missing key" in error.value.problem
    assert "layer1.3.conv1.weight" in error.value.problem  # ResNet-20 stops at layer1.2
    assert "model.name" in error.value.fix


def test_checkpoint_with_another_head_suggests_num_classes(shared_dir):
    with pytest.raises(RsvcError) as error:
        make_model("cifar_resnet20", num_classes=100, checkpoint=str(RESNET20_WEIGHTS))
    assert "linear.weight" in error.value.problem
    assert "model.num_classes=10" in error.value.fix


def test_unexpected_keys_are_listed(tmp_path):
    state_dict = make_model("test_resnet").module.state_dict()
    state_dict["extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state_dict, path)
    with pytest.raises(RsvcError) as error:
        make_model("test_resnet", checkpoint=str(path))
    assert "unexpected" in error.value.problem and "extra.weight" in error.value.problem


@pytest.mark.parametrize("layout", ["plain", "state_dict_with_module_prefix", "model_entry", "safetensors"])
def test_checkpoint_layouts_load_the_same_weights(layout, tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet").eval()
    state_dict = source.state_dict()
    path = tmp_path / ("weights.safetensors" if layout == "safetensors" else "weights.pth")
    if layout == "plain":
        torch.save(state_dict, path)
    elif layout == "state_dict_with_module_prefix":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    elif layout == "model_entry":
        torch.save({"model": state_dict, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    else:
        save_file({key: value.contiguous() for key, value in state_dict.items()}, str(path))

    torch.manual_seed(1)  # a differently initialized model must end up with the source's weights
    model = make_model("test_resnet", checkpoint=str(path))
    side = model.data_config.input_size
    torch.testing.assert_close(
        outputs_of(model.module, side), outputs_of(source, side), rtol=0, atol=OUTPUT_TOLERANCE
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "does not exist"),
        (b"not a torch file", "could not be read"),
        ({"epoch": 3, "note": "no weights here"}, "holds no state dict"),
    ],
)
def test_unusable_checkpoint_files(content, expected, tmp_path):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(RsvcError) as error:
        make_model("test_resnet", checkpoint=str(path))
    assert expected in error.value.problem
    assert "model.checkpoint=PATH" in error.value.fix


@pytest.mark.parametrize("target", ["tiny_custom_net.TinyNet", "tiny_custom_net:make_tiny_net"])
def test_target_import_path_with_state_dict(target, tiny_module_on_path):
    import tiny_custom_net

    torch.manual_seed(0)
    source = tiny_custom_net.TinyNet(width=5)
    path = tiny_module_on_path / "tiny.pt"
    torch.save(source.state_dict(), path)

    torch.manual_seed(1)
    model = make_model("tiny", target=target, checkpoint=str(path), kwargs={"width": 5})
    assert model.name == "tiny"
    assert isinstance(model.module, tiny_custom_net.TinyNet)
    assert model.num_classes == 3  # from a dummy forward: the module has no num_classes attribute
    assert model.data_config.input_size == 224  # timm's default for a module without a config
    torch.testing.assert_close(outputs_of(model.module, 32), outputs_of(source, 32), rtol=0, atol=OUTPUT_TOLERANCE)


def test_name_may_itself_be_an_import_path(tiny_module_on_path):
    model = make_model("tiny_custom_net.TinyNet", kwargs={"n_outputs": 4})
    assert model.num_classes == 4


@pytest.mark.parametrize(
    ("target", "kwargs", "expected"),
    [
        ("tiny_custom_net_missing.TinyNet", {}, "Cannot import"),
        ("tiny_custom_net.TinyNett", {}, "TinyNet"),
        ("tiny_custom_net.TinyNet", {"depth": 3}, "takes no argument 'depth'"),
        ("tiny_custom_net.torch", {}, "not a class or function"),
    ],
)
def test_bad_target_errors(target, kwargs, expected, tiny_module_on_path):
    with pytest.raises(RsvcError) as error:
        make_model("tiny", target=target, kwargs=kwargs)
    assert expected in error.value.problem
    assert error.value.fix
