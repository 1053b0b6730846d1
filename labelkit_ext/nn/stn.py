"""Spatial-transformer augmentation: a localisation net predicts a per-image affine ``theta``,
``AffineWarp`` (our fused ``affine_grid_sample``) applies it; plus the discriminator that tells
original from warped images, and the bounded affine parameterisation shared by the STN and a
random-affine baseline.

``theta`` follows ``F.affine_grid``: it maps output coordinates to input coordinates in the
normalised [-1, 1] frame, so translation 0.2 moves the image by a tenth of its width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from labelkit_ext.errors import UsageError
from labelkit_ext.nn.affine import AffineWarp, identity_theta

__all__ = [
    "MAX_SHEAR",
    "MAX_TRANSLATION",
    "PARAMETERISATIONS",
    "AffineBounds",
    "AugmentOutput",
    "RandomAffineWarp",
    "STNAugmenter",
    "WarpDiscriminator",
    "affine_from_unit",
    "check_bound_limits",
    "random_affine_theta",
    "theta_deviation",
    "theta_penalty",
]

PARAMETERISATIONS = ("free", "bounded")
NUM_PARAMS = 6  # rotation, scale x, scale y, shear, translation x, translation y


# The largest shear (x + h*y: h = 1 is 45 degrees) and translation (normalised units) a bound may
# allow: past them the warps are mostly stretched or empty images, not augmentations.
MAX_SHEAR = 1.0
MAX_TRANSLATION = 2.0


def check_bound_limits(
    label: Callable[[str], str], rotation: float, scale: float, shear: float, translation: float
) -> None:
    """The upper limits of the bounds (each already >= 0), errors naming a bound as
    ``label(name)``: ``AffineBounds`` says "rotation bound", the CLI "max_rotation"."""
    if rotation > 180:
        raise UsageError(f"{label('rotation')} must be <= 180 degrees, got {rotation}")
    if scale >= 1:
        raise UsageError(f"{label('scale')} must be < 1 (scale factors stay > 0), got {scale}")
    if shear > MAX_SHEAR:
        raise UsageError(f"{label('shear')} must be <= {MAX_SHEAR} (45 degrees), got {shear}")
    if translation > MAX_TRANSLATION:
        raise UsageError(
            f"{label('translation')} must be <= {MAX_TRANSLATION} (the full width: beyond it "
            f"every warp at the bound samples outside the image), got {translation}"
        )


@dataclass(frozen=True)
class AffineBounds:
    """Ranges of a bounded affine warp: rotation within ±``rotation`` degrees, each axis
    scaled by a factor in [1 - ``scale``, 1 + ``scale``], shear within ±``shear``, and
    translation within ±``translation`` (normalised units, 2 = the full width)."""

    rotation: float = 30.0
    scale: float = 0.2
    shear: float = 0.2
    translation: float = 0.2

    def __post_init__(self) -> None:
        for name in ("rotation", "scale", "shear", "translation"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UsageError(f"{name} bound must be a finite number >= 0, got {value!r}")
        check_bound_limits(
            lambda name: f"{name} bound", self.rotation, self.scale, self.shear, self.translation
        )

    def limits(self) -> torch.Tensor:
        """(6,) half-widths of (rotation [rad], scale x, scale y, shear, tx, ty)."""
        return torch.tensor(
            [
                math.radians(self.rotation),
                self.scale,
                self.scale,
                self.shear,
                self.translation,
                self.translation,
            ],  # fmt: skip
            dtype=torch.float64,  # cast to the caller's dtype, never rounded through float32
        )


def affine_from_unit(unit: torch.Tensor, bounds: AffineBounds) -> torch.Tensor:
    """(N, 2, 3) ``theta`` from (N, 6) values in [-1, 1], each scaled to its bound:
    ``A = R(rotation) @ [[1, shear], [0, 1]] @ diag(scale_x, scale_y)``, ``t = (tx, ty)``.
    Zero is the identity; every ``theta`` this returns lies within ``bounds``."""
    if unit.dim() != 2 or unit.shape[1] != NUM_PARAMS:
        raise ValueError(f"unit must have shape (N, {NUM_PARAMS}), got {tuple(unit.shape)}")
    p = unit * bounds.limits().to(unit)
    rot, sx, sy, shear, tx, ty = p.unbind(1)
    sx, sy = 1 + sx, 1 + sy
    cos, sin = torch.cos(rot), torch.sin(rot)
    # R @ Shear @ Scale, written out: R = [[c, -s], [s, c]], Shear @ Scale = [[sx, h*sy], [0, sy]].
    row0 = torch.stack([cos * sx, (cos * shear - sin) * sy, tx], dim=1)
    row1 = torch.stack([sin * sx, (sin * shear + cos) * sy, ty], dim=1)
    return torch.stack([row0, row1], dim=1)


def random_affine_theta(
    n: int, bounds: AffineBounds, *, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n, 2, 3) random warps: every parameter uniform over its bound (the random-affine
    baseline, with the same ranges as the bounded STN)."""
    unit = torch.rand(n, NUM_PARAMS, generator=generator, device=device) * 2 - 1
    return affine_from_unit(unit, bounds)


def theta_deviation(theta: torch.Tensor) -> torch.Tensor:
    """(N,) Frobenius norm of ``theta - I``: how far each warp is from the identity."""
    eye = torch.eye(2, 3, device=theta.device, dtype=theta.dtype)
    return (theta - eye).flatten(1).norm(dim=1)


def theta_penalty(theta: torch.Tensor, radius: float) -> torch.Tensor:
    """Mean of ``relu(||theta - I|| - radius) ** 2``: free inside the ball of ``radius``
    around the identity, quadratic outside it."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    return torch.relu(theta_deviation(theta) - radius).square().mean()


class AugmentOutput(NamedTuple):
    image: torch.Tensor  # (N, C, H, W) warped images
    theta: torch.Tensor  # (N, 2, 3)


def _localisation_features(in_channels: int, width: int) -> nn.Sequential:
    # No batch norm: the module is used frozen inside a training classifier, and its output
    # must not depend on the other images of a batch.
    # Strided from the first layer: a warp needs coarse layout only, and this net runs on
    # every training image of stages 2 and 3.
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 4 * width),
        nn.ReLU(inplace=True),
    )


class STNAugmenter(nn.Module):
    """Localisation net -> ``theta`` -> ``AffineWarp``: a learnable per-image augmentation.

    ``parameterisation``:
      * ``"free"``: ``theta = I + head(features)``, any affine map (the original STN);
      * ``"bounded"``: ``theta = affine_from_unit(tanh(head(features)), bounds)``, rotation,
        scale, shear and translation each within ``bounds`` by construction.

    The head is zero-initialised, so a new module outputs the identity warp: its output equals
    its input. Out-of-image samples read zeros (the data set's mean colour on normalised
    images).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        parameterisation: str = "bounded",
        bounds: AffineBounds | None = None,
        width: int = 16,
    ) -> None:
        super().__init__()
        if parameterisation not in PARAMETERISATIONS:
            raise ValueError(
                f"parameterisation must be one of {PARAMETERISATIONS}, got {parameterisation!r}"
            )
        if in_channels < 1 or width < 1:
            raise ValueError(f"in_channels and width must be >= 1, got {in_channels}, {width}")
        self.parameterisation = parameterisation
        self.bounds = bounds or AffineBounds()
        self.features = _localisation_features(in_channels, width)
        self.head = nn.Linear(4 * width, NUM_PARAMS)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.warp = AffineWarp(padding_mode="zeros", align_corners=False)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 6) unconstrained head outputs; zero at initialisation."""
        return self.head(self.features(x))

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 2, 3) warp of each image."""
        raw = self.raw(x)
        if self.parameterisation == "bounded":
            return affine_from_unit(torch.tanh(raw), self.bounds)
        return identity_theta(len(x), x.device, raw.dtype) + raw.view(-1, 2, 3)

    def forward(self, x: torch.Tensor) -> AugmentOutput:
        if x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
        theta = self.theta(x)
        return AugmentOutput(self.warp(x, theta.to(x.dtype)), theta)


class RandomAffineWarp(nn.Module):
    """Warps each image by a fresh ``random_affine_theta`` draw (torch's global generator):
    the random-affine baseline, over the same ranges as a bounded ``STNAugmenter``."""

    def __init__(self, bounds: AffineBounds | None = None) -> None:
        super().__init__()
        self.bounds = bounds or AffineBounds()
        self.warp = AffineWarp(padding_mode="zeros", align_corners=False)

    def forward(self, x: torch.Tensor) -> AugmentOutput:
        if x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
        theta = random_affine_theta(len(x), self.bounds, device=x.device).to(x.dtype)
        return AugmentOutput(self.warp(x, theta), theta)


class WarpDiscriminator(nn.Module):
    """A small CNN scoring how "original" an image looks: one logit per image (> 0: original,
    < 0: warped). No batch norm, since it sees batches of only one kind."""

    def __init__(self, in_channels: int, width: int = 16) -> None:
        super().__init__()
        if in_channels < 1 or width < 1:
            raise ValueError(f"in_channels and width must be >= 1, got {in_channels}, {width}")
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)
