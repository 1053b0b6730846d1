"""VGG16 from torchvision, with any input channels and a small-image head."""

from __future__ import annotations

from torch import nn

from labelkit_ext.models.base import Classifier

__all__ = ["vgg16"]


def vgg16(
    num_classes: int, in_channels: int = 3, batch_norm: bool = False, small_input: bool = False
) -> Classifier:
    """torchvision VGG16 (``batch_norm``: VGG16-BN). Inputs must be at least 32x32.

    ``features`` runs to the second 4096-d fully connected layer (dropout included);
    with ``small_input`` it stops at global average pooling of the conv features (512-d),
    the usual CIFAR head, dropping the ~120M parameters sized for 224x224 inputs.
    """
    # Imported here, not at the top: `labelkit run --help` would wait for it.
    from torchvision.models import vgg16 as tv_vgg16
    from torchvision.models import vgg16_bn as tv_vgg16_bn

    net = (tv_vgg16_bn if batch_norm else tv_vgg16)(weights=None)
    if in_channels != 3:
        net.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
    if small_input:
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        net.classifier = nn.Identity()
        return Classifier(net, 512, num_classes)
    net.classifier[6] = nn.Identity()
    return Classifier(net, 4096, num_classes)
