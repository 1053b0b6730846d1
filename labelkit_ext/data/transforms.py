"""The standard transforms over uint8 (C, H, W) tensors, and channel statistics."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from labelkit_ext.data.core import DatasetInfo

__all__ = ["ImageTransform", "build_transform", "channel_stats"]

# Images averaged for the statistics of a file-backed set (reading all of NIH would take minutes).
MAX_STAT_IMAGES = 512


class ImageTransform:
    """One uint8 (C, H, W) image -> normalised float32, optionally after a random crop (of the
    image's own size) of the image padded by ``padding`` (>= 1) zeros on every side, then (with
    ``flip``) a random horizontal flip.

    The same result, bit for bit, and the same random draws (``torch.randint`` for the crop's
    top, then its left, then ``torch.rand(1)`` for the flip) as torchvision v2's
    ``Compose([RandomCrop(size, padding), RandomHorizontalFlip(), ToDtype(float32, scale=True),
    Normalize(mean, std)])`` (tested), at a quarter to a half of its per-image cost
    (``bench/bench_transforms.py``): it runs once per image per epoch, where torchvision's took
    a fifth of an epoch of a small CNN on 16 px images. The padded image is never built: the
    crop window is copied onto zeros."""

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        padding: int | None = None,
        flip: bool = False,
    ) -> None:
        if padding is not None and (
            isinstance(padding, bool) or not isinstance(padding, int) or padding < 1
        ):
            raise ValueError(
                f"ImageTransform: padding must be None or an int >= 1, got {padding!r}"
            )
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.padding = padding
        self.flip = flip

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 3:
            raise ValueError(f"ImageTransform: image must be (C, H, W), got {tuple(image.shape)}")
        if self.padding is not None:
            image = self._random_crop(image, self.padding)
        if self.flip and torch.rand(1) < 0.5:
            image = image.flip(-1)
        # torchvision's ToDtype(scale=True) and Normalize, op for op (the same rounding).
        return image.to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std)

    @staticmethod
    def _random_crop(image: torch.Tensor, padding: int) -> torch.Tensor:
        """An (H, W) window of the image padded by ``padding`` zeros, at a random offset."""
        C, H, W = image.shape
        top = int(torch.randint(0, 2 * padding + 1, size=()))
        left = int(torch.randint(0, 2 * padding + 1, size=()))
        out = image.new_zeros((C, H, W))
        y0, x0 = top - padding, left - padding  # the window's origin in image coordinates
        ys, xs = slice(max(0, y0), min(H, H + y0)), slice(max(0, x0), min(W, W + x0))
        yd, xd = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
        out[:, yd, xd] = image[:, ys, xs]
        return out

    def __repr__(self) -> str:
        return f"ImageTransform(padding={self.padding}, flip={self.flip})"


def build_transform(info: DatasetInfo, train: bool, augment: bool = True) -> ImageTransform:
    """uint8 image -> normalised float32; for training with ``augment``, a random crop with
    ``image_size // 8`` zero padding, then a horizontal flip where ``info.flip``."""
    if not (train and augment):
        return ImageTransform(info.mean, info.std)
    return ImageTransform(info.mean, info.std, max(1, info.image_size // 8), flip=info.flip)


def channel_stats(images: torch.Tensor | Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of uint8 (N, C, H, W) images, or of the first
    ``MAX_STAT_IMAGES`` items of a dataset yielding (uint8 image, target)."""
    if not isinstance(images, torch.Tensor):
        n = min(len(images), MAX_STAT_IMAGES)
        images = torch.stack([images[i][0] for i in range(n)])
    x = images.double().div_(255.0).transpose(0, 1).flatten(1)
    std = x.std(dim=1).clamp_min(1e-3)  # a constant channel must not divide by zero
    return tuple(x.mean(dim=1).tolist()), tuple(std.tolist())
