"""digit-mosaic: an embedded multi-label set with chest-X-ray-like label statistics.

Each image is a 2x2 grid of cells; a cell is empty or holds a real digit (scikit-learn's
digits). The label is the set of digits present, multi-hot over 0-9. Like NIH ChestX-ray14
(about 54% "No Finding", 28% one finding, 18% several, findings long-tailed), a controllable
share of images is empty, single-label or multi-label, and digit frequencies fall
geometrically from 0 to 9.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from labelkit_ext.data.core import ArraySplit, RawDataset, holdout_indices, resize_images
from labelkit_ext.data.digits import DIGIT_NAMES, load_digits_raw
from labelkit_ext.errors import UsageError

__all__ = ["MosaicStats", "make_digit_mosaic", "load_digit_mosaic", "class_prior"]

GRID = 2
NUM_CLASSES = 10
# Weights of 2, 3, 4 findings among multi-label images (NIH: about 64% / 26% / 10%).
_MULTI_DECAY = 0.4


@dataclass(frozen=True)
class MosaicStats:
    """Label statistics of a mosaic split: shares of empty / single / multi-label images."""

    empty_fraction: float = 0.54
    multi_fraction: float = 0.18
    imbalance: float = 10.0  # frequency of the most common digit over the rarest one

    def __post_init__(self) -> None:
        for name in ("empty_fraction", "multi_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.empty_fraction + self.multi_fraction > 1.0:
            raise UsageError(
                f"empty_fraction + multi_fraction must be <= 1, got "
                f"{self.empty_fraction} + {self.multi_fraction}"
            )
        if self.imbalance < 1.0:
            raise UsageError(f"imbalance must be >= 1, got {self.imbalance}")


def class_prior(imbalance: float) -> np.ndarray:
    """Digit probabilities falling geometrically, p[0] / p[9] == ``imbalance``."""
    p = imbalance ** (-np.arange(NUM_CLASSES) / (NUM_CLASSES - 1))
    return p / p.sum()


def _label_counts(n: int, stats: MosaicStats, rng: np.random.Generator) -> np.ndarray:
    """How many digits each of ``n`` images holds (exact empty/multi shares, then shuffled)."""
    n_empty = round(n * stats.empty_fraction)
    n_multi = min(round(n * stats.multi_fraction), n - n_empty)
    weights = _MULTI_DECAY ** np.arange(GRID * GRID - 1)
    multi = rng.choice(np.arange(2, GRID * GRID + 1), size=n_multi, p=weights / weights.sum())
    counts = np.concatenate([np.zeros(n_empty, int), multi, np.ones(n - n_empty - n_multi, int)])
    return rng.permutation(counts)


def make_digit_mosaic(
    cells: torch.Tensor, labels: torch.Tensor, n: int, stats: MosaicStats, seed: int
) -> ArraySplit:
    """``n`` mosaics of the digit images ``cells`` (uint8 (M, 1, s, s)) with ``labels`` (M,).

    Each image's digits are distinct classes in distinct cells, so the number of non-empty
    cells equals the number of labels. Deterministic in ``seed``.
    """
    if n < 0:
        raise UsageError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    size = cells.shape[-1]
    by_class = [np.flatnonzero(labels.numpy() == k) for k in range(NUM_CLASSES)]
    if any(len(pool) == 0 for pool in by_class):
        raise UsageError("cells must hold at least one image of every digit")
    prior = class_prior(stats.imbalance)
    canvas = torch.zeros(n, 1, GRID * size, GRID * size, dtype=torch.uint8)
    targets = torch.zeros(n, NUM_CLASSES)
    for i, count in enumerate(_label_counts(n, stats, rng)):
        digits = rng.choice(NUM_CLASSES, size=count, replace=False, p=prior)
        positions = rng.choice(GRID * GRID, size=count, replace=False)
        for digit, pos in zip(digits, positions, strict=True):
            row, col = divmod(int(pos), GRID)
            image = cells[rng.choice(by_class[digit])]
            canvas[i, :, row * size : (row + 1) * size, col * size : (col + 1) * size] = image
            targets[i, digit] = 1.0
    return ArraySplit(canvas, targets)


def load_digit_mosaic(
    image_size: int = 32,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    n_train: int = 3000,
    n_val: int = 500,
    n_test: int = 1000,
    stats: MosaicStats | None = None,
) -> RawDataset:
    """Train / val / test mosaics, each composed from its own disjoint pool of digit images.

    The pools follow the ``digits`` split (test 20%, then ``val_fraction`` of train), so no
    digit image appears in two splits.
    """
    if image_size % GRID or image_size < 2 * GRID:
        raise UsageError(
            f"image_size must be an even number >= 4 for a 2x2 mosaic, got {image_size}"
        )
    stats = stats or MosaicStats()
    digits = load_digits_raw(split_seed)
    train_pool, test_pool = digits.splits["train"], digits.splits["test"]
    keep, held = holdout_indices(train_pool.targets, val_fraction, split_seed)
    pools = {"train": train_pool.subset(keep), "val": train_pool.subset(held), "test": test_pool}
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    splits = {}
    for offset, (name, pool) in enumerate(pools.items()):
        cells = resize_images(pool.images, image_size // GRID)
        splits[name] = make_digit_mosaic(
            cells, pool.targets, sizes[name], stats, split_seed * 3 + offset
        )
    return RawDataset(task="multilabel", class_names=DIGIT_NAMES, splits=splits, in_channels=1)
