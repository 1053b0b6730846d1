"""Reference implementation of the affine grid-sample op in plain PyTorch.

It is the two-call composition users write today, ``F.affine_grid`` then ``F.grid_sample``
(which materialises the full ``[N, Ho, Wo, 2]`` grid), computed in float64 for every input
dtype (it is the oracle first; the fallback second) and returned in the input's dtype and
memory format, plus the op's rule for samples whose θ is not finite (see
:func:`labelkit_ext.affine_grid_sample`). The benchmarks' "eager" baseline is the plain float32
composition instead (bench/bench_affine.py).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def _norm_step(n: int, align_corners: bool) -> float:
    if n <= 1:
        return 0.0
    return 1.0 / (n - 1) if align_corners else 1.0 / n


def valid_samples(
    theta: torch.Tensor, H: int, W: int, Ho: int, Wo: int, align_corners: bool
) -> torch.Tensor:
    """[N] bool: θ is finite and its pixel map fits float32 (the kernels' rule, ops/affine.h
    pixel_map). Other samples sample nothing. It also keeps huge coordinates away from
    ``F.grid_sample``, whose CPU kernel is not safe for them."""
    th = theta.double().reshape(-1, 6)
    kx, ky = _norm_step(Wo, align_corners), _norm_step(Ho, align_corners)
    sx = (W - 1) / 2 if align_corners else W / 2
    sy = (H - 1) / 2 if align_corners else H / 2
    x0, y0 = (Wo - 1) * kx, (Ho - 1) * ky
    coef = torch.stack(
        [
            sx * th[:, 0] * 2 * kx,
            sx * th[:, 1] * 2 * ky,
            sx * (th[:, 2] - th[:, 0] * x0 - th[:, 1] * y0) + (W - 1) / 2,
            sy * th[:, 3] * 2 * kx,
            sy * th[:, 4] * 2 * ky,
            sy * (th[:, 5] - th[:, 3] * x0 - th[:, 4] * y0) + (H - 1) / 2,
        ],
        dim=1,
    )
    limit = torch.finfo(torch.float32).max / 16
    return torch.isfinite(th).all(1) & (coef.abs() < limit).all(1)


def _affine_grid(theta: torch.Tensor, size: list[int], align_corners: bool) -> torch.Tensor:
    """``F.affine_grid``, without its notice that unit-size grids changed meaning in torch 1.3
    (the op is defined by today's meaning; a fallback user never called affine_grid)."""
    if not (align_corners and 1 in size[2:]) or torch.compiler.is_compiling():
        return F.affine_grid(theta, size, align_corners=align_corners)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Since version 1.3.0, affine_grid", UserWarning)
        return F.affine_grid(theta, size, align_corners=align_corners)


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
    # float64 throughout: in float32, affine_grid's and grid_sample's products and sums cost
    # several ulps of the coordinate, which at 224 pixels exceeds float32 tolerance.
    x = input.double()
    th = theta.double().expand(N, 2, 3)
    if N == 0 or C == 0:  # keeps the graph, so that empty batches still get (empty) gradients
        return (x.sum() + th.sum()).mul(0).expand(N, C, Ho, Wo).to(input.dtype)
    valid = valid_samples(th.detach(), H, W, Ho, Wo, align_corners).view(N, 1, 1)
    th = torch.where(valid, th, torch.zeros((), dtype=th.dtype, device=th.device))
    grid = _affine_grid(th, [N, C, Ho, Wo], align_corners)
    out = F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    out = torch.where(
        valid.view(N, 1, 1, 1), out, torch.zeros((), dtype=out.dtype, device=out.device)
    )
    channels_last = (
        input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return out.to(input.dtype).contiguous(memory_format=fmt)
