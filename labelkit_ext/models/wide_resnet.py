"""Wide ResNet (Zagoruyko & Komodakis, 2016), WRN-28-10 by default, for 32x32 inputs."""

from __future__ import annotations

import torch
from torch import nn

from labelkit_ext.errors import UsageError
from labelkit_ext.models.base import Classifier

__all__ = ["wide_resnet"]


class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3 plus shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(self.dropout(torch.relu(self.bn2(self.conv1(pre)))))
        # The projection reads the pre-activated input, as in the paper's reference code.
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


def wide_resnet(
    num_classes: int, in_channels: int = 3, depth: int = 28, widen: int = 10, dropout: float = 0.0
) -> Classifier:
    """WRN-``depth``-``widen``: three groups of (depth - 4) / 6 blocks at 16k, 32k, 64k
    channels (strides 1, 2, 2); features of size 64 * ``widen``."""
    if (depth - 4) % 6 or depth < 10:
        raise UsageError(f"depth must be 6n + 4 with n >= 1, got {depth}")
    if widen < 1:
        raise UsageError(f"widen must be >= 1, got {widen}")
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)]
    for group, stride in zip(range(3), (1, 2, 2), strict=True):
        for i in range(n):
            cin = widths[group] if i == 0 else widths[group + 1]
            layers.append(_WideBlock(cin, widths[group + 1], stride if i == 0 else 1, dropout))
    layers += [
        nn.BatchNorm2d(widths[3]),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ]
    features = nn.Sequential(*layers)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return Classifier(features, widths[3], num_classes)
