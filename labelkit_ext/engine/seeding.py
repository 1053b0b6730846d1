"""Reproducible seeding."""

from __future__ import annotations

import operator
import random

import numpy as np
import torch

__all__ = ["derive_seed", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every GPU).
    ``seed`` is any integer, a NumPy one included (``random.seed`` refuses those)."""
    seed = operator.index(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers, e.g. (run seed, epoch, rank).

    Reseeding from (seed, epoch) at every epoch start makes an epoch's data order, augmentation
    and dropout independent of what ran before, so a resumed run retraces an uninterrupted one.
    """
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
