"""Standard transforms (torchvision v2) over uint8 (C, H, W) tensors, and channel statistics."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from labelkit_ext.data.core import DatasetInfo

__all__ = ["build_transform", "channel_stats"]

# Images averaged for the statistics of a file-backed set (reading all of NIH would take minutes).
MAX_STAT_IMAGES = 512


def build_transform(info: DatasetInfo, train: bool, augment: bool = True) -> v2.Compose:
    """uint8 image -> normalised float32; for training with ``augment``, a random crop with
    ``image_size // 8`` zero padding, then a horizontal flip where ``info.flip``."""
    steps: list = []
    if train and augment:
        steps.append(v2.RandomCrop(info.image_size, padding=max(1, info.image_size // 8)))
        if info.flip:
            steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(info.mean), list(info.std))]
    return v2.Compose(steps)


def channel_stats(images: torch.Tensor | Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of uint8 (N, C, H, W) images, or of the first
    ``MAX_STAT_IMAGES`` items of a dataset yielding (uint8 image, target)."""
    if not isinstance(images, torch.Tensor):
        n = min(len(images), MAX_STAT_IMAGES)
        images = torch.stack([images[i][0] for i in range(n)])
    x = images.double().div_(255.0).transpose(0, 1).flatten(1)
    std = x.std(dim=1).clamp_min(1e-3)  # a constant channel must not divide by zero
    return tuple(x.mean(dim=1).tolist()), tuple(std.tolist())
