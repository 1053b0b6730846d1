"""The variants compared, and the classifier wrapper that mixes augmented images into
fine-tuning batches (so every variant fine-tunes with the same engine loop and step budget)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from labelkit_ext.errors import UsageError
from labelkit_ext.nn.stn import (
    AffineBounds,
    RandomAffineWarp,
    STNAugmenter,
    WarpDiscriminator,
)

__all__ = [
    "DEFAULT_VARIANTS",
    "VARIANTS",
    "MixedAugmentation",
    "Variant",
    "build_augmenter",
    "build_discriminator",
    "check_variants",
]


@dataclass(frozen=True)
class Variant:
    """One row of the comparison.

    ``augment``: ``"none"`` (fine-tune on the originals only), ``"random"`` (random affine
    warps within the bounds) or ``"stn"`` (a learnt augmenter, trained in stage 2).
    For ``"stn"``: the ``parameterisation`` of theta, whether a ``discriminator`` opposes the
    augmenter, and whether ``penalty`` (``theta_penalty``) regularises the free theta.
    """

    name: str
    augment: str
    description: str
    parameterisation: str = "free"
    discriminator: bool = False
    penalty: bool = False

    @property
    def learnt(self) -> bool:
        return self.augment == "stn"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("no-affine", "none", "no affine augmentation, same fine-tuning steps"),
        Variant("random-affine", "random", "random affine warps over the bounded ranges"),
        Variant(
            "stn",
            "stn",
            "the original: free theta, max-entropy + discriminator",
            parameterisation="free",
            discriminator=True,
        ),
        Variant(
            "stn-penalty",
            "stn",
            "free theta + penalty on ||theta - I|| beyond a radius, with discriminator",
            parameterisation="free",
            discriminator=True,
            penalty=True,
        ),
        Variant(
            "stn-bounded",
            "stn",
            "bounded rotation/scale/shear/translation, with discriminator",
            parameterisation="bounded",
            discriminator=True,
        ),
        Variant(
            "stn-nodisc",
            "stn",
            "bounded theta, max-entropy only (no discriminator)",
            parameterisation="bounded",
            discriminator=False,
        ),
    )
}
DEFAULT_VARIANTS = tuple(VARIANTS)


def check_variants(names: Sequence[str]) -> list[str]:
    """``names`` checked against ``VARIANTS``, duplicates removed, order kept."""
    if len(names) == 0:
        raise UsageError("variants must name at least one variant")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return list(dict.fromkeys(names))


def build_augmenter(variant: Variant, in_channels: int, bounds: AffineBounds) -> nn.Module | None:
    """A new augmenter for ``variant`` (an identity-initialised ``STNAugmenter``, a
    ``RandomAffineWarp``), or None for ``"none"``."""
    if variant.augment == "stn":
        return STNAugmenter(in_channels, parameterisation=variant.parameterisation, bounds=bounds)
    if variant.augment == "random":
        return RandomAffineWarp(bounds)
    return None


def build_discriminator(variant: Variant, in_channels: int) -> nn.Module | None:
    return WarpDiscriminator(in_channels) if variant.discriminator else None


class MixedAugmentation(nn.Module):
    """``classifier`` whose training batches have a random ``mix`` share of their images
    replaced by ``augmenter``'s output (the other images stay original). In eval mode, and
    with no augmenter, it is the classifier.

    The augmenter is frozen (no gradient, always in eval mode) and runs in float32 outside
    autocast. ``train_steps`` and ``augmented_images`` count what training saw; they are
    buffers, so a resumed fine-tuning (its checkpoint) goes on counting from the saved counts.
    """

    def __init__(self, classifier: nn.Module, augmenter: nn.Module | None, mix: float) -> None:
        super().__init__()
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        self.classifier = classifier
        self.augmenter = augmenter
        self.mix = mix
        if augmenter is not None:
            augmenter.requires_grad_(False)
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("augmented_images", torch.zeros((), dtype=torch.int64))

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def train(self, mode: bool = True) -> MixedAugmentation:
        super().train(mode)
        if self.augmenter is not None:
            self.augmenter.eval()
        return self

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        # Drawn for every variant, so all of them consume the random stream alike.
        pick = torch.rand(len(x), device=x.device) < self.mix
        if self.augmenter is None or not bool(pick.any()):
            return x
        self.augmented_images += pick.sum()
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            warped = self.augmenter(x[pick].float()).image.to(x.dtype)
        x = x.clone()
        x[pick] = warped
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.train_steps += 1
            x = self._augment(x)
        return self.classifier(x)
