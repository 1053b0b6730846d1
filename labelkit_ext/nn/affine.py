"""``AffineWarp``: the sampling stage of a spatial transformer, over :func:`affine_grid_sample`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from labelkit_ext.ops.affine import affine_grid_sample, check_modes, check_size_spec

__all__ = ["AffineWarp", "identity_theta"]


def identity_theta(
    batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[batch, 2, 3]`` identity matrices: the θ that leaves an image unchanged."""
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=device, dtype=dtype)
    return eye.expand(batch, 2, 3).clone()


class AffineWarp(nn.Module):
    """Warps each image by its own affine matrix θ, given by the caller (e.g. a localisation
    network): ``forward(input, theta)`` is :func:`labelkit_ext.affine_grid_sample`.

    Args:
        size: output ``(Ho, Wo)``; None keeps the input's ``(H, W)``.
        mode: ``'bilinear'`` (differentiable w.r.t. θ) | ``'nearest'``.
        padding_mode: ``'zeros'`` | ``'border'`` | ``'reflection'``.
        align_corners: as in ``F.affine_grid`` / ``F.grid_sample``.

    ``theta`` may be ``[N, 2, 3]``, ``[1, 2, 3]`` (shared) or ``[N, 6]`` (a localisation head's
    raw output, read row-major as ``[N, 2, 3]``). No parameters of its own.
    """

    def __init__(
        self,
        size: Sequence[int] | None = None,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        check_modes(mode, padding_mode, align_corners, "AffineWarp")
        self.size = check_size_spec(size, "AffineWarp")
        self.mode = mode
        self.padding_mode = padding_mode
        self.align_corners = align_corners

    def forward(self, input: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if isinstance(theta, torch.Tensor) and theta.dim() == 2 and theta.shape[1] == 6:
            theta = theta.view(-1, 2, 3)
        return affine_grid_sample(
            input, theta, self.size, self.mode, self.padding_mode, self.align_corners
        )

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, mode={self.mode!r}, padding_mode={self.padding_mode!r}, "
            f"align_corners={self.align_corners}"
        )
