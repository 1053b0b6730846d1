"""The test battery of ENGINEERING.md for affine_grid_sample and labelkit_ext.nn.AffineWarp."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FLOAT_DTYPES, assert_close, requires_ops
from hypothesis import given, settings
from hypothesis import strategies as st

from labelkit_ext import _ext, affine_grid_sample
from labelkit_ext.nn import AffineWarp, identity_theta
from labelkit_ext.reference.affine import affine_grid_sample_ref

MODES = ["bilinear", "nearest"]
PADDINGS = ["zeros", "border", "reflection"]
ALL_MODES = list(itertools.product(MODES, PADDINGS, [False, True]))
# From this many channels the CPU kernels work pixel-major (kPixelMajorChannels, affine_cpu.cpp).
PIXEL_MAJOR_C = 8


# ---- independent oracle: slow NumPy loops in float64, written from the documented formulas ------


def _base(i: int, n: int, align: bool) -> float:
    """F.affine_grid's normalised coordinate of output index i out of n."""
    if n == 1:
        return 0.0
    return (2 * i - (n - 1)) / (n - 1 if align else n)


def _unnormalise(g: float, size: int, align: bool) -> float:
    return (g + 1) / 2 * (size - 1) if align else ((g + 1) * size - 1) / 2


def _fold(u: float, lo: float, hi: float) -> float:
    """Reflect u into [lo, hi] by repeated mirroring (no closed form, unlike the kernels)."""
    if hi == lo:
        return lo
    width = hi - lo
    k = math.floor((u - lo) / (2 * width))  # jump whole periods, then at most two mirrors
    u = u - 2 * width * k
    while u > hi or u < lo:
        u = 2 * hi - u if u > hi else 2 * lo - u
    return u


def _pad(u: float, size: int, padding: str, align: bool) -> float:
    if padding == "border":
        return min(max(u, 0.0), size - 1.0) if not math.isnan(u) else u
    if padding == "reflection":
        if not math.isfinite(u):
            return math.nan
        u = _fold(u, 0.0, size - 1.0) if align else _fold(u, -0.5, size - 0.5)
        return min(max(u, 0.0), size - 1.0)
    return u


def source_coords(theta: np.ndarray, H, W, Ho, Wo, padding, align):
    """Padded source pixel coordinates [Ho, Wo, 2] of one θ (float64)."""
    out = np.empty((Ho, Wo, 2))
    for oy in range(Ho):
        for ox in range(Wo):
            xn, yn = _base(ox, Wo, align), _base(oy, Ho, align)
            gx = theta[0, 0] * xn + theta[0, 1] * yn + theta[0, 2]
            gy = theta[1, 0] * xn + theta[1, 1] * yn + theta[1, 2]
            out[oy, ox, 0] = _pad(_unnormalise(gx, W, align), W, padding, align)
            out[oy, ox, 1] = _pad(_unnormalise(gy, H, align), H, padding, align)
    return out


def oracle(x: np.ndarray, theta: np.ndarray, size, mode, padding, align) -> np.ndarray:
    N, C, H, W = x.shape
    Ho, Wo = size
    out = np.zeros((N, C, Ho, Wo))
    for n in range(N):
        if not np.isfinite(theta[n]).all():
            continue  # documented: a non-finite θ samples nothing
        coords = source_coords(theta[n], H, W, Ho, Wo, padding, align)
        for oy, ox in itertools.product(range(Ho), range(Wo)):
            px, py = coords[oy, ox]
            if math.isnan(px) or math.isnan(py):
                continue

            def pixel(xi, yi, n=n):
                inside = 0 <= xi < W and 0 <= yi < H
                return x[n, :, yi, xi] if inside else np.zeros(C)

            if mode == "nearest":
                out[n, :, oy, ox] = pixel(int(np.rint(px)), int(np.rint(py)))
                continue
            x0, y0 = math.floor(px), math.floor(py)
            fx, fy = px - x0, py - y0
            out[n, :, oy, ox] = (
                (1 - fx) * (1 - fy) * pixel(x0, y0)
                + fx * (1 - fy) * pixel(x0 + 1, y0)
                + (1 - fx) * fy * pixel(x0, y0 + 1)
                + fx * fy * pixel(x0 + 1, y0 + 1)
            )
    return out


# ---- inputs ------------------------------------------------------------------------------------


def make_theta(n: int, kind: str = "mixed", seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """θ batches covering what STN augmentation produces and worse: large rotations, shears, flips,
    scales that sample far outside the image, translations."""
    g = torch.Generator().manual_seed(seed)
    angle = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    scale = torch.exp(
        (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * 1.6
    )  # 0.2 .. 5
    flip = torch.where(torch.rand(n, 2, generator=g) < 0.3, -1.0, 1.0).double()
    shear = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * 1.5
    shift = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * 2.5
    if kind == "near_identity":
        angle, scale, shear, flip = angle * 0.1, scale**0.1, shear * 0.1, torch.ones_like(flip)
        shift = shift * 0.1
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    sh = torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)
    sh[:, 0, 1] = shear
    A = rot @ sh @ torch.diag_embed(scale * flip)
    return torch.cat([A, shift.unsqueeze(-1)], dim=-1).to(dtype)


def make_images(shape, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def ref64(x, theta, size=None, mode="bilinear", padding="zeros", align=False):
    """The reference on exactly the same values, in float64."""
    return affine_grid_sample_ref(x.double(), theta.double(), size, mode, padding, align)


def decided(theta: torch.Tensor, H, W, Ho, Wo, padding, align) -> torch.Tensor:
    """[N, 1, Ho, Wo] mask of output pixels whose nearest-neighbour choice is not a rounding tie:
    away from those, float32 and float64 must pick the same pixel."""
    masks = []
    for t in theta.double().cpu().numpy():
        c = source_coords(t, H, W, Ho, Wo, padding, align)
        frac = np.abs(c - np.floor(c) - 0.5)
        masks.append(torch.from_numpy((frac > 1e-3).all(-1)))
    return torch.stack(masks).unsqueeze(1)


# ---- 2. the reference against the oracle ---------------------------------------------------------


@pytest.mark.parametrize("mode,padding,align", ALL_MODES)
def test_reference_matches_oracle(mode, padding, align):
    x = make_images((3, 2, 5, 7), torch.float64)
    theta = make_theta(3, seed=1)
    for size in [(5, 7), (4, 9), (1, 1)]:
        ref = affine_grid_sample_ref(x, theta, size, mode, padding, align)
        exp = oracle(x.numpy(), theta.numpy(), size, mode, padding, align)
        keep = (
            decided(theta, 5, 7, *size, padding, align)
            if mode == "nearest"
            else torch.ones(1, dtype=torch.bool)
        )
        torch.testing.assert_close(ref * keep, torch.from_numpy(exp) * keep, rtol=1e-10, atol=1e-10)


# ---- 1. forward against the reference -------------------------------------------------------------


@pytest.mark.parametrize("mode,padding,align", ALL_MODES)
def test_forward_matches_oracle_float64(device, mode, padding, align):
    x = make_images((4, 3, 6, 5), torch.float64, device)
    theta = make_theta(4, seed=2).to(device)
    out = affine_grid_sample(x, theta, (7, 4), mode, padding, align)
    exp = torch.from_numpy(
        oracle(x.cpu().numpy(), theta.cpu().numpy(), (7, 4), mode, padding, align)
    )
    keep = (
        decided(theta, 6, 5, 7, 4, padding, align)
        if mode == "nearest"
        else torch.ones(1, dtype=torch.bool)
    )
    assert_close((out.cpu() * keep), exp * keep)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "shape,size",
    [
        ((2, 3, 7, 13), None),
        ((3, 2, 1, 1), None),
        ((2, 1, 1, 1), (3, 4)),
        ((2, 3, 224, 224), None),
        ((3, 4, 16, 9), (5, 21)),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_forward_matches_reference(device, dtype, shape, size, mode):
    x = make_images(shape, dtype, device)
    theta = make_theta(shape[0], seed=3).to(device)
    theta = theta.to(dtype if dtype == torch.float64 else torch.float32)
    for padding in PADDINGS:
        out = affine_grid_sample(x, theta, size, mode, padding)
        assert out.dtype == dtype and out.shape == (shape[0], shape[1], *(size or shape[2:]))
        exp = ref64(x, theta, size, mode, padding)
        if mode == "nearest":
            keep = decided(theta, *shape[2:], *(size or shape[2:]), padding, False).to(device)
            out, exp = out * keep, exp * keep
        assert_close(out, exp)


def test_unit_size_outputs_raise_no_torch_notice(device):
    """affine_grid warns about unit-size grids with align_corners=True (their meaning changed
    in torch 1.3); neither the op nor its reference (the fallback) passes that on."""
    x = make_images((2, 3, 5, 6), torch.float32, device)
    theta = make_theta(2, seed=1).float().to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for size in [(1, 1), (1, 4), (3, 1)]:
            out = affine_grid_sample(x, theta, size, align_corners=True)
            assert_close(out, affine_grid_sample_ref(x, theta, size, align_corners=True))


@pytest.mark.parametrize("c", [9, 20, 64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_channel_chunks(device, c, channels_last):
    """Many channels on few pixels: the CUDA forward splits the channels into chunks (one work
    item each; a last chunk shorter than the others) so that small images still fill the GPU."""
    x = make_images((3, c, 6, 5), torch.float64, device, seed=c)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    theta = make_theta(3, seed=5).to(device)
    for mode, padding in itertools.product(MODES, PADDINGS):
        out = affine_grid_sample(x, theta, (4, 7), mode, padding)
        exp = ref64(x, theta, (4, 7), mode, padding)
        if mode == "nearest":
            keep = decided(theta, 6, 5, 4, 7, padding, False).to(device)
            out, exp = out * keep, exp * keep
        assert_close(out, exp)


@pytest.mark.parametrize("kind", ["mixed", "near_identity"])
def test_forward_theta_kinds_float32(device, kind):
    x = make_images((16, 3, 32, 32), torch.float32, device)
    theta = make_theta(16, kind, seed=4).float().to(device)
    for padding, align in itertools.product(PADDINGS, [False, True]):
        assert_close(
            affine_grid_sample(x, theta, None, "bilinear", padding, align),
            ref64(x, theta, None, "bilinear", padding, align),
        )


def test_identity_and_translation_are_exact(device):
    x = make_images((2, 3, 8, 10), torch.float64, device)
    eye = identity_theta(2, device, torch.float64)
    for align in (False, True):
        assert_close(affine_grid_sample(x, eye, align_corners=align), x)
    # A shift by exactly one pixel to the left (normalised step 2/W) moves every column by one.
    shift = eye.clone()
    shift[:, 0, 2] = 2 / 10
    out = affine_grid_sample(x, shift)
    assert_close(out[..., :-1], x[..., 1:])
    assert (out[..., -1] == 0).all()


@requires_ops  # the reference is torch's two-call composition, whose grid is rounded (below)
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("shape", [(8, 10), (7, 13), (49, 49)])
def test_theta_gradient_at_identity_is_the_forward_slope(device, shape, align):
    """At θ = I every sample sits exactly on a pixel, bilinear's kink. The kernel maps pixel
    centres to pixel centres exactly, so it takes the floor convention's slope (the forward
    difference) at every pixel. torch's affine_grid + grid_sample rounds the grid a few ulps off
    the integers (1,470 of 2,401 points at 49x49), so its gradient there mixes left and right
    slopes pixel by pixel; the oracle here is the forward difference, written out."""
    H, W = shape
    x = make_images((2, 3, H, W), torch.float64, device)
    w = make_images((2, 3, H, W), torch.float64, device, seed=1)
    theta = identity_theta(2, device, torch.float64).requires_grad_()
    out = affine_grid_sample(x, theta, align_corners=align)
    assert torch.equal(out, x)
    (grad,) = torch.autograd.grad((out * w).sum(), theta)
    # dL/du, dL/dv with zeros padding: the pixel to the right (below) minus the pixel itself.
    pad_x, pad_y = F.pad(x, (0, 1)), F.pad(x, (0, 0, 0, 1))
    dl_du = (w * (pad_x[..., 1:] - x)).sum(1)
    dl_dv = (w * (pad_y[..., 1:, :] - x)).sum(1)
    xn = torch.tensor([_base(i, W, align) for i in range(W)], dtype=torch.float64, device=device)
    yn = torch.tensor([_base(i, H, align) for i in range(H)], dtype=torch.float64, device=device)
    sx, sy = ((W - 1) / 2, (H - 1) / 2) if align else (W / 2, H / 2)
    expected = torch.stack(
        [
            torch.stack([(d * xn).sum((1, 2)), (d * yn[:, None]).sum((1, 2)), d.sum((1, 2))], 1) * s
            for d, s in ((dl_du, sx), (dl_dv, sy))
        ],
        1,
    )
    assert_close(grad, expected)


def test_broadcast_theta(device):
    x = make_images((5, 2, 9, 9), torch.float32, device)
    theta = make_theta(1, seed=5).float().to(device)
    assert_close(
        affine_grid_sample(x, theta), affine_grid_sample(x, theta.expand(5, 2, 3).contiguous())
    )


def test_channels_last_and_noncontiguous(device):
    x = make_images((3, 5, 12, 11), torch.float32, device)
    theta = make_theta(3, seed=6).float().to(device)
    exp = ref64(x, theta)
    cl = x.to(memory_format=torch.channels_last)
    out = affine_grid_sample(cl, theta)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, exp)
    strided = make_images((3, 10, 24, 11), torch.float32, device)[:, ::2, ::2]
    assert not strided.is_contiguous()
    assert_close(affine_grid_sample(strided, theta), ref64(strided, theta))
    theta_t = theta.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous θ
    assert_close(affine_grid_sample(x, theta_t), exp)


def test_empty_batches_and_channels(device):
    for shape in [(0, 3, 5, 5), (2, 0, 5, 5)]:
        x = torch.rand(shape, device=device, requires_grad=True)
        theta = make_theta(shape[0]).float().to(device).requires_grad_()
        out = affine_grid_sample(x, theta, (4, 6))
        assert out.shape == (shape[0], shape[1], 4, 6)
        out.sum().backward()
        assert x.grad.shape == x.shape and theta.grad.shape == theta.shape
        assert (theta.grad == 0).all()


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("channels", [2, PIXEL_MAJOR_C])
def test_non_finite_theta_samples_nothing(device, padding, channels):
    x = make_images((4, channels, 9, 7), torch.float32, device).requires_grad_()
    theta = make_theta(4, seed=7).float().to(device)
    theta[1, 0, 0] = math.nan
    theta[2, 1, 2] = math.inf
    theta[3, 0, 1] = -1e38  # finite, but the map overflows
    theta.requires_grad_()
    out = affine_grid_sample(x, theta, (5, 6), "bilinear", padding)
    assert torch.isfinite(out).all()
    assert (out[1:3] == 0).all()
    assert_close(out[0], ref64(x, theta, (5, 6), "bilinear", padding)[0])
    gx, gt = torch.autograd.grad(out.sum(), (x, theta))
    assert torch.isfinite(gx).all() and torch.isfinite(gt).all()
    assert (gx[1:3] == 0).all() and (gt[1:3] == 0).all()


def test_far_outside_and_huge_theta(device):
    x = make_images((3, 2, 8, 8), torch.float64, device)
    # A 1000x zoom-out (reflection folds it over ~1000 mirror cells; not round numbers, which
    # would put nearest-mode samples on rounding ties), a shift by 1e9, a near-singular map.
    theta = torch.tensor(
        [
            [[1234.567, 0, 0.1], [0, 1100.3, 0.05]],
            [[1, 0, 1e9], [0, 1, -1e9]],
            [[1e-9, 0, 0.3], [0, 1e-9, 0.1]],
        ],
        dtype=torch.float64,
        device=device,
    )
    for mode, padding, align in ALL_MODES:
        assert_close(
            affine_grid_sample(x, theta, None, mode, padding, align),
            ref64(x, theta, None, mode, padding, align),
        )
        for i in range(
            3
        ):  # one sample at a time: the gather path, reflection's cell search included
            xi, ti = x[i : i + 1], theta[i : i + 1]
            gx, gt = _grads(affine_grid_sample, xi, ti, (5, 6), mode, padding, align)
            rx, rt = _grads(affine_grid_sample_ref, xi, ti, (5, 6), mode, padding, align)
            if i == 1 and padding == "reflection":
                # Folded back from u ~ 4e9, where one ulp of the coordinate is 5e-7 pixel: both
                # sides are only defined to that precision. Finite and in bounds is the claim.
                assert torch.isfinite(gx).all() and torch.isfinite(gt).all()
                continue
            assert_close(gx, rx)
            if mode == "bilinear":
                assert_close(gt, rt)


@pytest.mark.parametrize("mode,padding", list(itertools.product(MODES, PADDINGS)))
def test_input_grad_when_corners_overflow(device, mode, padding):
    """A shear so large that opposite output corners map to +inf and -inf (a NaN extent): the
    input gradient's gather must still find every output pixel that read something (under
    reflection it found 40 of 1094). The op is linear in x, so <g, out> = <grad_x, x> for the
    gradient of <g, out>: the gather must be the forward's exact transpose. (Coordinates here
    are beyond float's precision, so the forward is not compared with grid_sample, whose own
    bilinear backward crashes on this θ on CPU.)"""
    x = make_images((1, 2, 40, 40), torch.float64, device).float().requires_grad_()
    theta = torch.tensor([[[2e37, -2e37, 0.0], [0.0, 1.0, 0.0]]], device=device)
    out = affine_grid_sample(x, theta, None, mode, padding)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device)
    (gx,) = torch.autograd.grad(out, x, g)
    assert (out != 0).sum() > 40  # many output pixels read a pixel
    lhs = (g.double() * out.double()).sum()
    rhs = (gx.double() * x.double()).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-5, abs=1e-4)


def test_input_grad_of_a_row_longer_than_float_integers(device):
    """Wo - 1 = 2^24 + 3 rounds up in float: the gather's output range must stop at Wo - 1
    (it read one pixel past the row: here the sentinel beside the gradient)."""
    Wo = 2**24 + 4
    x = torch.ones(1, 1, 2, 2, device=device, requires_grad=True)
    theta = torch.zeros(1, 2, 3, device=device)  # every output pixel samples the centre
    out = affine_grid_sample(x, theta, (1, Wo))
    padded = torch.ones(1, 1, 1, Wo + 1, device=device)
    padded[..., Wo] = 1e6  # a read past the row picks this up
    (gx,) = torch.autograd.grad(out, x, padded[..., :Wo])
    # Each output pixel puts weight 1/4 on each of the 4 pixels (exactly representable sums).
    assert_close(gx, torch.full_like(x, Wo / 4))


def test_extreme_input_values(device):
    x = make_images((2, 2, 6, 6), torch.float32, device)
    x[0, 0, 2, 3] = math.inf
    x[1, 1, 0, 0] = math.nan
    x[0, 1] = 1e30
    theta = make_theta(2, "near_identity", seed=8).float().to(device)
    for mode, padding in itertools.product(MODES, PADDINGS):
        assert_close(
            affine_grid_sample(x, theta, None, mode, padding), ref64(x, theta, None, mode, padding)
        )


# ---- 3. gradients ---------------------------------------------------------------------------------


def _grads(fn, x, theta, size, mode, padding, align, seed=0, w_dtype=None):
    """Gradients of (out * w).sum() w.r.t. (x, θ); w is rounded to ``w_dtype`` first, so that a
    low-precision call and its float64 reference see the same incoming gradient."""
    x = x.detach().requires_grad_()
    theta = theta.detach().requires_grad_()
    out = fn(x, theta, size, mode, padding, align)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(w_dtype or out.dtype)
    w = w.to(out.device, out.dtype)
    return torch.autograd.grad((out * w).sum(), (x, theta), allow_unused=True)


@pytest.mark.parametrize("mode,padding,align", ALL_MODES)
@pytest.mark.parametrize("n", [1, 5])  # one sample: the gather path; several: the per-sample one
def test_grads_match_reference_float64(device, mode, padding, align, n):
    x = make_images((n, 3, 7, 6), torch.float64, device)
    theta = make_theta(n, seed=9).to(device)
    gx, gt = _grads(affine_grid_sample, x, theta, (5, 8), mode, padding, align)
    rx, rt = _grads(affine_grid_sample_ref, x, theta, (5, 8), mode, padding, align)
    assert_close(gx, rx)
    assert_close(gt, rt if rt is not None else torch.zeros_like(gt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grads_match_reference_low_precision(device, dtype):
    x = make_images((4, 3, 15, 13), dtype, device)
    theta = make_theta(4, "near_identity", seed=10).float().to(device)
    gx, gt = _grads(affine_grid_sample, x, theta, None, "bilinear", "zeros", False, w_dtype=dtype)
    rx, rt = _grads(
        affine_grid_sample_ref,
        x.double(),
        theta.double(),
        None,
        "bilinear",
        "zeros",
        False,
        w_dtype=dtype,
    )
    assert gx.dtype == dtype and gt.dtype == torch.float32
    assert_close(gx, rx)
    assert_close(gt, rt, torch.float32)


@pytest.mark.parametrize("mode,padding,align", ALL_MODES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("n", [1, 5])
def test_many_channels_match_reference(device, mode, padding, align, channels_last, n):
    """Images of many channels (pixel-major on CPU; one sample: the rows-parallel gathers for the
    backward) against the reference, forward and both gradients, in either layout."""
    for c in (PIXEL_MAJOR_C, PIXEL_MAJOR_C + 5):
        x = make_images((n, c, 7, 6), torch.float64, device, seed=c)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        theta = make_theta(n, seed=21).to(device)
        out = affine_grid_sample(x, theta, (5, 8), mode, padding, align)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert_close(out, affine_grid_sample_ref(x, theta, (5, 8), mode, padding, align))
        gx, gt = _grads(affine_grid_sample, x, theta, (5, 8), mode, padding, align)
        rx, rt = _grads(affine_grid_sample_ref, x, theta, (5, 8), mode, padding, align)
        assert_close(gx, rx)
        assert_close(gt, rt if rt is not None else torch.zeros_like(gt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_many_channels_low_precision(device, dtype, channels_last):
    x = make_images((4, 2 * PIXEL_MAJOR_C, 15, 13), dtype, device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    theta = make_theta(4, "near_identity", seed=22).float().to(device)
    assert_close(affine_grid_sample(x, theta), ref64(x, theta, None, "bilinear", "zeros", False))
    gx, gt = _grads(affine_grid_sample, x, theta, None, "bilinear", "zeros", False, w_dtype=dtype)
    rx, rt = _grads(
        affine_grid_sample_ref, x.double(), theta.double(), None, "bilinear", "zeros", False,
        w_dtype=dtype,
    )  # fmt: skip
    assert gx.dtype == dtype
    assert_close(gx, rx)
    assert_close(gt, rt, torch.float32)


@pytest.mark.parametrize("padding", PADDINGS)
def test_gather_and_scatter_paths_agree(device, padding):
    """The batch (per-sample scatter on CPU) equals each sample alone (the gather)."""
    x = make_images((6, 2, 11, 9), torch.float64, device)
    theta = make_theta(6, seed=11).to(device)
    gx, gt = _grads(affine_grid_sample, x, theta, (8, 10), "bilinear", padding, False)
    w_all = torch.randn(
        (6, 2, 8, 10), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    for i in range(6):
        w = w_all[i : i + 1].to(device)
        xi, ti = x[i : i + 1].detach().requires_grad_(), theta[i : i + 1].detach().requires_grad_()
        out = affine_grid_sample(xi, ti, (8, 10), "bilinear", padding)
        sx, st_ = torch.autograd.grad((out * w).sum(), (xi, ti))
        assert_close(sx, gx[i : i + 1])
        assert_close(st_, gt[i : i + 1])


@pytest.mark.parametrize("padding,align", list(itertools.product(PADDINGS, [False, True])))
def test_gradcheck(device, padding, align):
    x = make_images((2, 2, 5, 4), torch.float64, device).requires_grad_()
    theta = make_theta(2, "near_identity", seed=12).to(device).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, t: affine_grid_sample(a, t, (4, 6), "bilinear", padding, align), (x, theta)
    )
    assert torch.autograd.gradcheck(
        lambda a: affine_grid_sample(a, theta.detach(), (4, 6), "nearest", padding, align), (x,)
    )


def test_double_backward_is_a_clear_error(device):
    """Gradient penalties through a warp need a second derivative: the kernels raise naming the
    reference to use (never PyTorch's silent zeros); the reference is twice differentiable."""
    x = make_images((2, 1, 5, 4), torch.float64, device).requires_grad_()
    theta = make_theta(2, "near_identity", seed=15).to(device).requires_grad_()
    gx, gt = torch.autograd.grad(
        affine_grid_sample(x, theta, (4, 6)).square().sum(), (x, theta), create_graph=True
    )
    if not _ext.HAS_OPS:
        torch.autograd.gradgradcheck(lambda a, t: affine_grid_sample(a, t, (4, 6)), (x, theta))
        return
    for g in (gx, gt):
        with pytest.raises(RuntimeError, match="double backward.*affine_grid_sample_ref"):
            torch.autograd.grad(g.sum(), (x, theta))


def test_gradcheck_large_transforms(device):
    x = make_images((3, 1, 6, 5), torch.float64, device).requires_grad_()
    theta = make_theta(3, "mixed", seed=13).to(device).requires_grad_()
    for padding in PADDINGS:
        assert torch.autograd.gradcheck(
            lambda a, t, p=padding: affine_grid_sample(a, t, None, "bilinear", p), (x, theta)
        )


def test_input_only_and_theta_only_grads(device):
    x = make_images((3, 2, 9, 8), torch.float64, device)
    theta = make_theta(3, seed=14).to(device)
    rx, rt = _grads(affine_grid_sample_ref, x, theta, None, "bilinear", "zeros", False)
    xr = x.clone().requires_grad_()
    out = affine_grid_sample(xr, theta)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(
        device
    )
    (gx,) = torch.autograd.grad((out * w).sum(), xr)
    assert_close(gx, rx)
    tr = theta.clone().requires_grad_()
    out = affine_grid_sample(x, tr)
    (gt,) = torch.autograd.grad((out * w).sum(), tr)
    assert_close(gt, rt)


def test_deterministic_algorithms(device):
    x = make_images((4, 3, 20, 20), torch.float32, device)
    theta = make_theta(4, seed=15).float().to(device)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = _grads(affine_grid_sample, x, theta, None, "bilinear", "zeros", False)
        second = _grads(affine_grid_sample, x, theta, None, "bilinear", "zeros", False)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ---- 7. bad input -------------------------------------------------------------------------------

_X = torch.rand(2, 3, 5, 5)
_T = torch.rand(2, 2, 3)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: affine_grid_sample([1.0], _T), TypeError, "input must be a torch.Tensor"),
        (lambda: affine_grid_sample(_X.long(), _T), ValueError, "input must be a floating-point"),
        (lambda: affine_grid_sample(_X[0], _T), ValueError, r"input must be 4-D \[N, C, H, W\]"),
        (lambda: affine_grid_sample(torch.rand(2, 3, 0, 5), _T), ValueError, "H >= 1 and W >= 1"),
        (lambda: affine_grid_sample(_X, "theta"), TypeError, "theta must be a torch.Tensor"),
        (lambda: affine_grid_sample(_X, _T.int()), ValueError, "theta must be a floating-point"),
        (
            lambda: affine_grid_sample(_X, _T.double()),
            ValueError,
            "theta dtype torch.float64 does not match",
        ),
        (
            lambda: affine_grid_sample(_X.double(), _T),
            ValueError,
            "theta dtype torch.float32 does not match",
        ),
        (
            lambda: affine_grid_sample(_X, _T.to("meta")),
            ValueError,
            "theta must be on the input's device",
        ),
        (
            lambda: affine_grid_sample(_X, _T[:, :, :2]),
            ValueError,
            r"theta must have shape \[N, 2, 3\]",
        ),
        (
            lambda: affine_grid_sample(_X, _T.view(2, 6)),
            ValueError,
            r"theta must have shape \[N, 2, 3\]",
        ),
        (
            lambda: affine_grid_sample(_X, torch.rand(3, 2, 3)),
            ValueError,
            "theta has 3 matrices but input has N = 2",
        ),
        (lambda: affine_grid_sample(_X, _T, (0, 4)), ValueError, "size entries must be positive"),
        (lambda: affine_grid_sample(_X, _T, (4, -1)), ValueError, "size entries must be positive"),
        (
            lambda: affine_grid_sample(_X, _T, (2**31, 2**31)),
            ValueError,
            r"size \(2147483648, 2147483648\) is too large",
        ),
        (lambda: affine_grid_sample(_X, _T, (4,)), ValueError, r"size must be None or \(Ho, Wo\)"),
        (lambda: affine_grid_sample(_X, _T, (4.0, 4)), ValueError, "size must hold two ints"),
        (lambda: affine_grid_sample(_X, _T, mode="bicubic"), ValueError, "mode must be one of"),
        (
            lambda: affine_grid_sample(_X, _T, padding_mode="wrap"),
            ValueError,
            "padding_mode must be one of",
        ),
        (
            lambda: affine_grid_sample(_X, _T, align_corners=1),
            ValueError,
            "align_corners must be a bool",
        ),
        (lambda: AffineWarp(mode="area"), ValueError, "AffineWarp: mode"),
        (lambda: AffineWarp(padding_mode="circular"), ValueError, "AffineWarp: padding_mode"),
        (lambda: AffineWarp(size=(3, 0)), ValueError, "AffineWarp: size"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@requires_ops
def test_kernel_checks_directly():
    """The C++ ops refuse bad arguments themselves, even when the wrapper is bypassed."""
    op = torch.ops.labelkit.affine_grid_sample
    with pytest.raises(RuntimeError, match="theta has 3 matrices but input has N = 2"):
        op(_X, torch.rand(3, 2, 3), 5, 5, 0, 0, False)
    with pytest.raises(RuntimeError, match="size entries must be positive"):
        op(_X, _T, 0, 5, 0, 0, False)
    with pytest.raises(RuntimeError, match="mode must be 0"):
        op(_X, _T, 5, 5, 7, 0, False)
    with pytest.raises(RuntimeError, match="padding_mode must be 0"):
        op(_X, _T, 5, 5, 0, 3, False)
    with pytest.raises(RuntimeError, match="input must be 4-D"):
        op(_X[0], _T, 5, 5, 0, 0, False)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        torch.ops.labelkit._affine_grid_sample_backward(
            torch.rand(2, 4, 5, 5), _X, _T, 0, 0, False, [True, True]
        )


# ---- 4. opcheck ---------------------------------------------------------------------------------


@requires_ops
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    x = make_images((2, 3, 6, 7), torch.float32, device).requires_grad_(requires_grad)
    theta = make_theta(2, seed=16).float().to(device).requires_grad_(requires_grad)
    xb = make_images((2, 2, 5, 5), torch.bfloat16, device).requires_grad_(requires_grad)
    op = torch.ops.labelkit.affine_grid_sample.default
    torch.library.opcheck(op, (x, theta, 4, 9, 0, 0, False))
    torch.library.opcheck(op, (x, theta, 6, 7, 1, 2, True))
    torch.library.opcheck(op, (xb, theta, 5, 5, 0, 1, False))
    grad = torch.rand(2, 3, 4, 9, device=device)
    bwd = torch.ops.labelkit._affine_grid_sample_backward.default
    torch.library.opcheck(bwd, (grad, x.detach(), theta.detach(), 0, 0, False, [True, True]))
    torch.library.opcheck(bwd, (grad, x.detach(), theta.detach(), 0, 2, True, [False, True]))


# ---- 5. torch.compile ---------------------------------------------------------------------------


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x = make_images((3, 2, 10, 9), torch.float32).requires_grad_()
    theta = make_theta(3, seed=17).float().requires_grad_()
    warp = AffineWarp(size=(8, 8), padding_mode="border")

    def fn(img, t):
        return (warp(img, t) ** 2).mean() + affine_grid_sample(img, t, mode="nearest").sum()

    compiled = torch.compile(fn, fullgraph=True)
    loss = fn(x, theta)
    g_eager = torch.autograd.grad(loss, (x, theta))
    loss_c = compiled(x, theta)
    g_comp = torch.autograd.grad(loss_c, (x, theta))
    assert_close(loss_c, loss)
    for a, b in zip(g_comp, g_eager, strict=True):
        assert_close(a, b)


# ---- 6. autocast ----------------------------------------------------------------------------------


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_output_dtype(device, amp_dtype):
    loc = torch.nn.Linear(4, 6).to(device)
    x = make_images((3, 2, 8, 8), torch.float32, device)
    with torch.autocast(device_type=device, dtype=amp_dtype):
        theta = loc(torch.randn(3, 4, device=device)).view(3, 2, 3)
        assert theta.dtype == amp_dtype
        out = affine_grid_sample(x, theta)
    assert out.dtype == torch.float32  # the input's dtype; θ is read in float32
    assert_close(out, ref64(x, theta))


# ---- nn.AffineWarp --------------------------------------------------------------------------------


def test_affine_warp_module(device):
    x = make_images((4, 3, 10, 12), torch.float32, device)
    theta = make_theta(4, seed=18).float().to(device)
    warp = AffineWarp(size=(6, 7), mode="bilinear", padding_mode="reflection", align_corners=True)
    assert list(warp.parameters()) == []
    assert "reflection" in repr(warp)
    expected = affine_grid_sample(x, theta, (6, 7), "bilinear", "reflection", True)
    assert_close(warp(x, theta), expected)
    assert_close(warp(x, theta.reshape(4, 6)), expected)  # a localisation head's raw output
    assert_close(AffineWarp()(x, identity_theta(4, device)), x)


def test_affine_warp_trains_theta():
    """A tiny STN step: gradient descent through the warp recovers a known shift of a smooth
    image (a blob; noise would give no gradient beyond a pixel)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 24), torch.linspace(-1, 1, 24), indexing="ij")
    x = torch.exp(-((xx - 0.2) ** 2 + (yy + 0.1) ** 2) / 0.15).view(1, 1, 24, 24)
    true = identity_theta(1)
    true[0, 0, 2] = 0.25
    target = affine_grid_sample(x, true)
    theta = identity_theta(1).requires_grad_()
    opt = torch.optim.SGD([theta], lr=2.0)
    warp = AffineWarp()
    losses = []
    for _ in range(60):
        loss = F.mse_loss(warp(x, theta), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    assert abs(theta[0, 0, 2].item() - 0.25) < 0.05


# ---- 9. property tests (index arithmetic: taps, padding folds, the inverse-map gather) -------------


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.sampled_from([1, 2, 3, PIXEL_MAJOR_C, PIXEL_MAJOR_C + 3]),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    ho=st.integers(1, 9),
    wo=st.integers(1, 9),
    mode=st.sampled_from(MODES),
    padding=st.sampled_from(PADDINGS),
    align=st.booleans(),
    kind=st.sampled_from(["mixed", "near_identity"]),
    seed=st.integers(0, 2**16),
    channels_last=st.booleans(),
)
def test_property_matches_reference(
    n, c, h, w, ho, wo, mode, padding, align, kind, seed, channels_last
):
    x = make_images((n, c, h, w), torch.float64, seed=seed)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    theta = make_theta(n, kind, seed=seed)
    out = affine_grid_sample(x, theta, (ho, wo), mode, padding, align)
    exp = affine_grid_sample_ref(x, theta, (ho, wo), mode, padding, align)
    assert_close(out, exp)
    gx, gt = _grads(affine_grid_sample, x, theta, (ho, wo), mode, padding, align, seed)
    rx, rt = _grads(affine_grid_sample_ref, x, theta, (ho, wo), mode, padding, align, seed)
    assert_close(gx, rx)
    assert_close(gt, rt if rt is not None else torch.zeros_like(gt))


# ---- 8. the fallback ------------------------------------------------------------------------------


def test_fallback_routing_matches_build():
    assert _ext.has_kernel("affine_grid_sample", "cpu") == _ext.HAS_OPS
    assert _ext.has_kernel("_affine_grid_sample_backward", "cpu") == _ext.HAS_OPS


def test_bench_affine_smoke(tmp_path):
    """bench/bench_affine.py end to end on a tiny size: checks pass, rows and table are written."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_affine.py"
    cmd = [
        sys.executable, str(bench), "--sizes", "4,2,9,11", "--dtypes", "float32,bfloat16",
        "--modes", "forward,full", "--providers", "ours,eager", "--no-compile", "--no-memory",
        "--min-run-time", "0.01", "--out", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("*/affine.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 2 * 2 * 2  # dtypes x modes x providers
    assert all(r["correct"] == "True" and float(r["time_ms"]) > 0 for r in rows)
    assert (path.parent / "affine.md").read_text().count("\n|") >= 5
