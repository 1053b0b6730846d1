"""A small CNN that trains in seconds on two CPU cores."""

from __future__ import annotations

from torch import nn

from labelkit_ext.errors import UsageError
from labelkit_ext.models.base import Classifier

__all__ = ["small_cnn"]


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


def small_cnn(
    num_classes: int, in_channels: int = 3, width: int = 32, dropout: float = 0.0
) -> Classifier:
    """Three conv-BN-ReLU blocks (``width``, 2x, 4x channels, two 2x2 max-pools), global
    average pooling, optional dropout; features of size ``4 * width``. Any input >= 4x4."""
    if width < 1:
        raise UsageError(f"width must be >= 1, got {width}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {dropout}")
    features = nn.Sequential(
        *_block(in_channels, width),
        nn.MaxPool2d(2),
        *_block(width, 2 * width),
        nn.MaxPool2d(2),
        *_block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
    )
    return Classifier(features, 4 * width, num_classes)
