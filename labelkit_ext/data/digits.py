"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images; nothing to download)."""

from __future__ import annotations

import numpy as np
import torch

from labelkit_ext.data.core import ArraySplit, RawDataset, holdout_indices

__all__ = ["DIGIT_NAMES", "digit_arrays", "load_digits_raw"]

DIGIT_NAMES = tuple(str(d) for d in range(10))
TEST_FRACTION = 0.2


def digit_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as uint8 (N, 1, 8, 8) images (0..16 ink scaled to 0..255) and labels."""
    # Imported here, not at the top: `labelkit run --help` would wait for it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(bunch.target.astype(np.int64))


def load_digits_raw(split_seed: int = 0) -> RawDataset:
    """Digits with a stratified 80/20 train/test split fixed by ``split_seed``."""
    images, labels = digit_arrays()
    full = ArraySplit(images, labels)
    train, test = holdout_indices(labels, TEST_FRACTION, split_seed)
    return RawDataset(
        task="multiclass",
        class_names=DIGIT_NAMES,
        splits={"train": full.subset(train), "test": full.subset(test)},
        in_channels=1,
    )
