"""Small CIFAR-10 classifiers whose weights ship in ``shared/models/cifar10``.

The architectures are written from the facts in that folder's README: module names match the
checkpoint keys, so a strict load succeeds (ResNets after stripping ``module.``). Every activation
and shortcut is its own module, used once per forward pass, so that each intermediate output
(``layer2``, ``layer2.0``, ``layer2.0.relu2``, ``l4``, ``l4.fc2``, ...) can be recorded or replaced
with a forward hook. No operation is in place, so a hook that replaces an output never corrupts
the input of another module.

Each model carries its preprocessing as ``model.data_config`` (input size and normalization).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rsvc_cli.models.loading import DataConfig

CIFAR10_NUM_CLASSES = 10

# The ResNets were trained on x/255 normalized with ImageNet statistics (README).
CIFAR_RESNET_DATA_CONFIG = DataConfig(
    input_size=32,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    interpolation="bilinear",
)
# Tiniest was trained on x/255 - 0.5: mean 0.5, std 1.0.
TINIEST_DATA_CONFIG = DataConfig(
    input_size=32,
    mean=(0.5, 0.5, 0.5),
    std=(1.0, 1.0, 1.0),
    interpolation="bilinear",
)


# --------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016), "option A" shortcuts
# --------------------------------------------------------------------------------------------


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: subsample by 2, zero-pad the new channels on both sides."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.in_channels == self.out_channels:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        pad = (self.out_channels - self.in_channels) // 2
        return F.pad(x, (0, 0, 0, 0, pad, self.out_channels - self.in_channels - pad))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class CifarBasicBlock(nn.Module):
    """out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = OptionAShortcut(in_channels, out_channels, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): conv1/bn1, layer1..3 (widths 16/32/64), global average pool, linear."""

    def __init__(self, depth: int, num_classes: int = CIFAR10_NUM_CLASSES):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n_blocks = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.data_config = CIFAR_RESNET_DATA_CONFIG

        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(16, 16, n_blocks, stride=1)
        self.layer2 = self._make_layer(16, 32, n_blocks, stride=2)
        self.layer3 = self._make_layer(32, 64, n_blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _make_layer(in_channels: int, out_channels: int, n_blocks: int, stride: int) -> nn.Sequential:
        blocks = [CifarBasicBlock(in_channels, out_channels, stride)]
        blocks += [CifarBasicBlock(out_channels, out_channels, 1) for _ in range(n_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


def cifar_resnet20(num_classes: int = CIFAR10_NUM_CLASSES) -> CifarResNet:
    """CIFAR ResNet-20 (3 blocks per stage), weights: resnet20-12fca82f.th."""
    return CifarResNet(20, num_classes=num_classes)


def cifar_resnet56(num_classes: int = CIFAR10_NUM_CLASSES) -> CifarResNet:
    """CIFAR ResNet-56 (9 blocks per stage), weights: resnet56-4bfd9763.th."""
    return CifarResNet(56, num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# Tiniest: LayerNorm + depthwise mixer + gated MLP
# --------------------------------------------------------------------------------------------


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels of an (n, c, h, w) map, applied channels-last (key ``<name>.ln``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TanhExpGate(nn.Module):
    """h = tanh(exp(g)) * g * v, with (g, v) the two channel halves of the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = x.chunk(2, dim=1)
        return torch.tanh(torch.exp(gate)) * gate * value


class TiniestBlock(nn.Module):
    """Depthwise multi-scale mixer on 3 of 4 channel chunks, then a gated 1x1 MLP, scaled residual."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 4 != 0:
            raise ValueError(f"Tiniest block width must be divisible by 4, got {dim}")
        chunk = dim // 4
        self.dwconv1 = nn.Conv2d(chunk, chunk, 3, padding=1, groups=chunk)
        self.dwconv2 = nn.Conv2d(chunk, chunk, 7, padding=3, groups=chunk)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.dwconv3 = nn.Conv2d(chunk, chunk, 7, padding=9, dilation=3, groups=chunk)
        self.ln = ChannelLayerNorm(dim)
        self.fc1 = nn.Conv2d(dim, 2 * dim, 1)
        self.gate = TanhExpGate()
        self.fc2 = nn.Conv2d(dim, dim, 1)
        self.rs = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c0, c1, c2, c3 = x.chunk(4, dim=1)
        mixed = torch.cat([c0, self.dwconv1(c1), self.dwconv2(c2), self.dwconv3(self.pool(c3))], dim=1)
        hidden = self.gate(self.fc1(self.ln(mixed)))
        return torch.addcmul(self.fc2(hidden), x, self.rs)  # fc2(h) + x * rs in one pass


class Tiniest(nn.Module):
    """conv1 -> ln1 -> l1..l3 (48) -> dsconv (stride 2) -> ln2 -> l4..l6 (80) -> pool -> fc."""

    def __init__(self, num_classes: int = CIFAR10_NUM_CLASSES, dims: tuple[int, int] = (48, 80)):
        super().__init__()
        dim1, dim2 = dims
        self.num_classes = num_classes
        self.data_config = TINIEST_DATA_CONFIG

        self.conv1 = nn.Conv2d(3, dim1, 3, padding=1)
        self.ln1 = ChannelLayerNorm(dim1)
        self.l1 = TiniestBlock(dim1)
        self.l2 = TiniestBlock(dim1)
        self.l3 = TiniestBlock(dim1)
        self.dsconv = nn.Conv2d(dim1, dim2, 4, stride=2, padding=1, groups=16)
        self.ln2 = ChannelLayerNorm(dim2)
        self.l4 = TiniestBlock(dim2)
        self.l5 = TiniestBlock(dim2)
        self.l6 = TiniestBlock(dim2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(dim2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.l3(self.l2(self.l1(self.ln1(self.conv1(x)))))
        x = self.l6(self.l5(self.l4(self.ln2(self.dsconv(x)))))
        return self.fc(self.flatten(self.avgpool(x)))


def tiniest(num_classes: int = CIFAR10_NUM_CLASSES) -> Tiniest:
    """Tiniest CIFAR-10 net (97,530 parameters), weights: tiniest.pt."""
    return Tiniest(num_classes=num_classes)


BUILTIN_MODELS = {
    "cifar_resnet20": cifar_resnet20,
    "cifar_resnet56": cifar_resnet56,
    "tiniest": tiniest,
}
