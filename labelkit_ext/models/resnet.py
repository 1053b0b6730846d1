"""ResNet-18 from torchvision, with a CIFAR stem for small images and any input channels."""

from __future__ import annotations

from torch import nn

from labelkit_ext.models.base import Classifier

__all__ = ["resnet18"]


def resnet18(num_classes: int, in_channels: int = 3, cifar_stem: bool = False) -> Classifier:
    """torchvision ResNet-18; ``features`` is the network up to global pooling (512-d).

    ``cifar_stem`` swaps the 7x7 stride-2 conv and max-pool for a 3x3 stride-1 conv, the usual
    choice for 32x32 inputs (keeps spatial detail that the ImageNet stem would discard).
    """
    # Imported here, not at the top: `labelkit run --help` would wait for it.
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    if cifar_stem or in_channels != 3:
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return Classifier(net, 512, num_classes)
