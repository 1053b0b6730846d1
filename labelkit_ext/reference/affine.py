"""Reference implementation of the affine grid-sample op in plain PyTorch.

It is the two-call composition users write today, ``F.affine_grid`` then ``F.grid_sample``
(which materialises the full ``[N, Ho, Wo, 2]`` grid), computed in float32 for
float16/bfloat16 inputs and returned in the input's dtype, plus the op's rule for samples whose
θ is not finite (see :func:`labelkit_ext.affine_grid_sample`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from labelkit_ext.reference.entropy import accumulation_dtype


def affine_grid_sample_ref(
    input: torch.Tensor,
    theta: torch.Tensor,
    size: tuple[int, int] | None = None,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """``F.grid_sample(input, F.affine_grid(theta, (N, C, Ho, Wo)))`` in the op's conventions.

    ``theta`` is ``[N, 2, 3]`` or ``[1, 2, 3]``; ``size`` is ``(Ho, Wo)`` or None for the input's
    ``(H, W)``. Arguments are assumed valid (the public wrapper checks them).
    """
    N, C, H, W = input.shape
    Ho, Wo = (H, W) if size is None else (int(size[0]), int(size[1]))
    compute = accumulation_dtype(input.dtype)
    x = input.to(compute)
    th = theta.to(compute).expand(N, 2, 3)
    if N == 0 or C == 0:
        return input.new_empty((N, C, Ho, Wo))
    grid = F.affine_grid(th, [N, C, Ho, Wo], align_corners=align_corners)
    out = F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    # A sample with a non-finite θ samples nothing (all zeros), whatever the padding mode.
    finite = torch.isfinite(th).flatten(1).all(dim=1).view(N, 1, 1, 1)
    out = torch.where(finite, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.to(input.dtype)
