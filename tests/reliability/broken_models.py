"""Models whose chosen layer outputs nothing usable, for `model._target_=broken_models.NAME`.

`features` is the layer to record: a constant map (ConstantNet: the same value everywhere, every
image; ZeroNet: all zeros, a dead ReLU layer) or one full of NaN (NaNNet, a diverged checkpoint).
The head after it is an ordinary linear classifier, so the rest of the pipeline runs.
"""

from __future__ import annotations

import torch
from torch import nn


class _Fill(nn.Module):
    def __init__(self, value: float, channels: int):
        super().__init__()
        self.value = value
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        # Touch the input so the output stays on the graph (gradients, devices) like a real layer.
        return torch.full((n, self.channels, h, w), self.value, dtype=x.dtype, device=x.device) + 0 * x.mean()


class _BrokenNet(nn.Module):
    value = 1.0

    def __init__(self, num_classes: int = 2, channels: int = 8):
        super().__init__()
        # Stride 4: the filled map has the stem's grid, as a real layer's map has some convolution's grid
        # (rsvc records a 4-d output as a feature map only then).
        self.stem = nn.Conv2d(3, 3, 1, stride=4)
        self.features = _Fill(self.value, channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(self.stem(x))).flatten(1))


class ConstantNet(_BrokenNet):
    value = 0.5


class ZeroNet(_BrokenNet):
    value = 0.0


class NaNNet(_BrokenNet):
    value = float("nan")
