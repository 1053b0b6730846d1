"""Fuzz tests of affine_grid_sample and its backward op: odd shapes (empty batches, 1-pixel images,
channel counts on both sides of the CPU's pixel-major threshold), every layout for the images and
for the incoming gradient, θ from near-identity to singular, non-finite and huge, wrong dtypes,
devices and arguments. Each input either matches the float64 reference or raises the documented
error (python_tests/fuzzing.py; docs/testing.md)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOLERANCES
from fuzzing import (
    FLOAT_DTYPES,
    NON_FLOAT_DTYPES,
    Raises,
    arrange,
    check_op,
    devices,
    float_tensors,
    layouts,
    other_device,
    registered_op,
)
from hypothesis import given
from hypothesis import strategies as st
from test_affine import decided

from labelkit_ext import affine_grid_sample
from labelkit_ext.ops.affine import MODES, PADDING_MODES
from labelkit_ext.reference.affine import affine_grid_sample_ref

pytestmark = pytest.mark.fuzz

OP = "affine_grid_sample"
# 1-2 channels: per-channel rows on CPU; 3-4: pixel-major with 4 lanes; 5+: pixel-major, C lanes.
CHANNELS = st.sampled_from([0, 1, 2, 3, 4, 5, 8, 17])
EXTENTS = st.integers(1, 9)
THETA_SPECIALS = [math.nan, math.inf, -math.inf, 1e38, -1e38, 1e9, 0.0]


@st.composite
def image_shapes(draw, allow_bad: bool = False) -> tuple[int, ...]:
    shape = (draw(st.integers(0, 3)), draw(CHANNELS), draw(EXTENTS), draw(EXTENTS))
    if allow_bad and draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([shape[1:], (*shape, 2), (shape[0], shape[1], 0, shape[3])]))
    return shape


@st.composite
def thetas(
    draw, n: int, dtype: torch.dtype, device: str, kinks: bool = True, huge: bool = True
) -> torch.Tensor:
    """[n, 2, 3]: a random map (rotation, scale up to 3x either way, shear, flips, shift), now
    and then a singular map, or entries from THETA_SPECIALS. With ``kinks``, also the identity
    and zero entries, which put coordinates exactly on pixel centres: there θ's gradient has a
    kink, and ours and the reference's (a few ulps off the centre) may take either side, so
    the gradient tests leave them out. ``huge`` allows 1e9, which puts coordinates far beyond
    float32's integers: reflection then folds a coordinate float32 holds only to ±32 pixels;
    and a float64 pixel map's offsets cancel (1e9·a − 1e9·a), which costs 1e-7 pixel, far
    above float64's tolerance. So only zeros/border padding in float32 and below get it (the
    battery's test_far_outside_and_huge_theta pins chosen huge maps)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kinds = ["random", "random", "singular"] + (["identity"] if kinks else [])
    kind = draw(st.sampled_from(kinds))
    specials = [v for v in THETA_SPECIALS if (kinks or v != 0.0) and (huge or v != 1e9)]
    theta = (torch.rand(n, 2, 3, generator=g, dtype=torch.float64) * 2 - 1) * 1.5
    if kind == "identity":
        theta = torch.eye(2, 3, dtype=torch.float64).repeat(n, 1, 1)
    elif kind == "singular":
        theta[:, 1, :2] = theta[:, 0, :2] * 0.5
    flat = theta.view(-1)
    if flat.numel():
        for i, v in draw(
            st.lists(
                st.tuples(st.integers(0, flat.numel() - 1), st.sampled_from(specials)),
                max_size=2,
            )
        ):
            flat[i] = v
    return theta.to(dtype=dtype, device=device)


def images(data, shape, dtype, device) -> torch.Tensor:
    """Finite values at a drawn scale (0 to 1e5, ties included) in a drawn layout. Non-finite
    pixels are the battery's subject (test_extreme_input_values): here a weight that is 0 in
    float64 and 1e-8 in float32 would turn the reference's NaN into our inf."""
    if not dtype.is_floating_point:
        return arrange(
            torch.randint(0, 3, shape).to(dtype=dtype, device=device), data.draw(layouts())
        )
    x = data.draw(float_tensors(shape, torch.float64, specials=False))
    big = torch.finfo(dtype).max / 4  # float16 would turn 1e5-scale values into inf
    return arrange(x.clamp(-big, big).to(device=device, dtype=dtype), data.draw(layouts()))


def compare_warps(x, theta, size, mode, padding, align):
    """The forward against the float64 reference. Interpolation error scales with the input's
    range, not with an output pixel (a near-zero blend of ±1e5 neighbours), so the absolute
    tolerance is the dtype's relative one times max |x|. A nearest pixel on a rounding tie may
    pick either neighbour (the reference's coordinates are a few ulps off ours): only decided
    pixels are compared."""

    def compare(actual, expected):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        assert actual.device == expected.device
        a, e = actual.double().cpu(), expected.double().cpu()
        tol = TOLERANCES[expected.dtype]
        if mode == "nearest" and a.numel():
            H, W = x.shape[2:]
            keep = decided(theta.expand(x.shape[0], 2, 3), H, W, *a.shape[2:], padding, align)
            a, e = a * keep, e * keep
        scale = x.double().abs().amax().item() if x.numel() else 0.0
        torch.testing.assert_close(
            a, e, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale, equal_nan=True
        )

    return compare


# ---- the public function ----------------------------------------------------------------------------


def _argument_errors(x, theta, size, mode, padding, align) -> list[Raises]:
    errors = []
    if not x.is_floating_point():
        errors.append(Raises(ValueError, f"{OP}: input must be a floating-point tensor"))
    if x.dim() != 4:
        errors.append(Raises(ValueError, rf"{OP}: input must be 4-D \[N, C, H, W\]"))
    elif x.shape[2] < 1 or x.shape[3] < 1:
        errors.append(Raises(ValueError, f"{OP}: input must have H >= 1 and W >= 1"))
    if not theta.is_floating_point():
        errors.append(Raises(ValueError, f"{OP}: theta must be a floating-point tensor"))
    elif x.is_floating_point() and (theta.dtype == torch.float64) != (x.dtype == torch.float64):
        errors.append(Raises(ValueError, f"{OP}: theta dtype .* does not match input dtype"))
    if theta.device != x.device:
        errors.append(Raises(ValueError, f"{OP}: theta must be on the input's device"))
    if theta.dim() != 3 or tuple(theta.shape[1:]) != (2, 3):
        errors.append(Raises(ValueError, rf"{OP}: theta must have shape \[N, 2, 3\]"))
    elif x.dim() >= 1 and theta.shape[0] not in (x.shape[0], 1):
        errors.append(Raises(ValueError, f"{OP}: theta has .* matrices but input has N ="))
    if size is not None and any(s <= 0 for s in size):
        errors.append(Raises(ValueError, f"{OP}: size entries must be positive"))
    if mode not in MODES:
        errors.append(Raises(ValueError, f"{OP}: mode must be one of"))
    if padding not in PADDING_MODES:
        errors.append(Raises(ValueError, f"{OP}: padding_mode must be one of"))
    return errors


@given(data=st.data())
def test_affine_grid_sample_fuzz(data):
    device = data.draw(devices())
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES * 3 + NON_FLOAT_DTYPES))
    x = images(data, data.draw(image_shapes(allow_bad=True)), dtype, device)
    n = x.shape[0] if x.dim() == 4 else 2
    theta_n = data.draw(st.sampled_from([n, n, 1, n + 1]))
    theta_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    theta_dtype = data.draw(
        st.sampled_from([theta_dtype] * 6 + [torch.float64, torch.float16, torch.int64])
    )
    padding = data.draw(st.sampled_from(list(PADDING_MODES) * 4 + ["wrap"]))
    huge = dtype != torch.float64 and padding != "reflection"
    theta = data.draw(thetas(theta_n, theta_dtype, device, huge=huge))
    if data.draw(st.integers(0, 19)) == 0:
        theta = theta.to(other_device(device))
    if data.draw(st.integers(0, 19)) == 0:
        theta = theta[..., :2]
    size = data.draw(st.one_of(st.none(), st.tuples(st.integers(-1, 9), st.integers(-1, 9))))
    mode = data.draw(st.sampled_from(list(MODES) * 4 + ["bicubic"]))
    align = data.draw(st.booleans())
    expect = _argument_errors(x, theta, size, mode, padding, align)
    check_op(
        lambda: affine_grid_sample(x, theta, size, mode, padding, align),
        lambda: affine_grid_sample_ref(
            x, theta.expand(x.shape[0], 2, 3), size, mode, padding, align
        ),
        expect,
        compare_warps(x, theta, size, mode, padding, align) if not expect else None,
    )


@given(data=st.data())
def test_affine_grid_sample_valid_fuzz(data):
    """Valid arguments only (the mixed test above draws mostly documented errors), so every
    example's warp is compared: dtypes, layouts, shared θ, special θ entries, sizes, modes."""
    device = data.draw(devices())
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    x = images(data, data.draw(image_shapes()), dtype, device)
    theta_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    padding = data.draw(st.sampled_from(list(PADDING_MODES)))
    huge = dtype != torch.float64 and padding != "reflection"
    theta_n = data.draw(st.sampled_from([x.shape[0], 1]))
    theta = data.draw(thetas(theta_n, theta_dtype, device, huge=huge))
    size = data.draw(st.one_of(st.none(), st.tuples(EXTENTS, EXTENTS)))
    mode, align = data.draw(st.sampled_from(list(MODES))), data.draw(st.booleans())
    check_op(
        lambda: affine_grid_sample(x, theta, size, mode, padding, align),
        lambda: affine_grid_sample_ref(
            x, theta.expand(x.shape[0], 2, 3), size, mode, padding, align
        ),
        (),
        compare_warps(x, theta, size, mode, padding, align),
    )


# ---- gradients -----------------------------------------------------------------------------------


def tie_free(theta, H, W, Ho, Wo, padding, align) -> torch.Tensor:
    """[N, 1, Ho, Wo] float64 mask of the output pixels whose nearest-neighbour choice is no
    rounding tie (test_affine.decided). An incoming gradient zeroed on the others makes both
    gradients comparable pixel for pixel, instead of skipping a whole example with one tie."""
    if theta.shape[0] == 0:
        return torch.ones(0, 1, Ho, Wo, dtype=torch.float64)
    return decided(theta, H, W, Ho, Wo, padding, align).double()


def _grads(fn, x, theta, size, mode, padding, align, w):
    x = x.detach().requires_grad_()
    theta = theta.detach().requires_grad_()
    out = fn(x, theta, size, mode, padding, align)
    return torch.autograd.grad((out * w).sum(), (x, theta), allow_unused=True)


@given(data=st.data())
def test_affine_grid_sample_grad_fuzz(data):
    """Both gradients in every layout of the images and of the incoming gradient, against the
    float64 reference's (on the same rounded values). Images in [-1, 1]: here the layouts,
    shapes and maps are under test, not the value range."""
    device = data.draw(devices())
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    shape = data.draw(image_shapes())
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = arrange(
        (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(
            device=device, dtype=dtype
        ),
        data.draw(layouts()),
    )
    theta_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    padding = data.draw(st.sampled_from(list(PADDING_MODES)))
    huge = dtype != torch.float64 and padding != "reflection"
    theta = data.draw(thetas(shape[0], theta_dtype, device, kinks=False, huge=huge))
    size = data.draw(st.one_of(st.none(), st.tuples(EXTENTS, EXTENTS)))
    mode = data.draw(st.sampled_from(list(MODES)))
    align = data.draw(st.booleans())
    Ho, Wo = size or shape[2:]
    w = torch.rand((shape[0], shape[1], Ho, Wo), generator=g, dtype=torch.float64) * 2 - 1
    if mode == "nearest":  # a tie sends a pixel's gradient to either neighbour
        w = w * tie_free(theta, *shape[2:], Ho, Wo, padding, align)
    w = arrange(w.to(device=device, dtype=dtype), data.draw(layouts()))
    gx, gt = _grads(affine_grid_sample, x, theta, size, mode, padding, align, w)
    rx, rt = _grads(
        affine_grid_sample_ref, x.double(), theta.double(), size, mode, padding, align, w.double()
    )
    assert gx.shape == x.shape and gx.dtype == dtype and gt.dtype == theta_dtype
    torch.testing.assert_close(gx.double().cpu(), rx.cpu(), equal_nan=True, **TOLERANCES[dtype])
    assert_theta_grad_close(gt, rt, shape, Ho, Wo)


def assert_theta_grad_close(gt, rt, shape, Ho, Wo):
    """θ's gradient sums C·Ho·Wo terms of either sign, each up to about W (a slope of values in
    [-1, 1] times the un-normalisation scale), computed in θ's dtype from the same rounded
    inputs as the reference: the absolute tolerance is θ's dtype's relative one times that
    bound."""
    rt = rt if rt is not None else torch.zeros_like(gt, dtype=torch.float64)
    tol = TOLERANCES[gt.dtype]
    bound = max(1, shape[1] * Ho * Wo) * max(shape[2:])
    torch.testing.assert_close(
        gt.double().cpu(),
        rt.double().cpu(),
        rtol=tol["rtol"],
        atol=tol["atol"] + tol["rtol"] * bound,
    )


# ---- the backward op, wrapper bypassed ----------------------------------------------------------------


@given(data=st.data())
def test_affine_backward_op_fuzz(data):
    """The registered backward with bad gradients (wrong rank, N, C, device) raises; a good one
    in any layout matches the reference's gradients."""
    device = data.draw(devices())
    op = registered_op("_affine_grid_sample_backward", device)
    if op is None:
        pytest.skip(f"no compiled _affine_grid_sample_backward kernel for {device}")
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    shape = data.draw(image_shapes())
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = arrange(
        (torch.rand(shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype),
        data.draw(layouts()),
    )
    theta_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    mode, padding = data.draw(st.sampled_from([0, 1])), data.draw(st.sampled_from([0, 1, 2]))
    huge = dtype != torch.float64 and padding != PADDING_MODES["reflection"]
    theta = data.draw(thetas(shape[0], theta_dtype, device, kinks=False, huge=huge))
    Ho, Wo = data.draw(EXTENTS), data.draw(EXTENTS)
    gshape = [shape[0], shape[1], Ho, Wo]
    bad = data.draw(st.sampled_from([None] * 6 + ["rank", "n", "c", "device"]))
    if bad == "rank":
        gshape = gshape[1:]
    elif bad in ("n", "c"):
        gshape[0 if bad == "n" else 1] += 1
    align = data.draw(st.booleans())
    grad = torch.rand(gshape, generator=g, dtype=torch.float64)
    if mode == 1 and bad is None:  # nearest: a tie sends a pixel's gradient to either neighbour
        grad = grad * tie_free(theta, *shape[2:], Ho, Wo, list(PADDING_MODES)[padding], align)
    grad = arrange(grad.to(device=device, dtype=dtype), data.draw(layouts()))
    if bad == "device":
        grad = grad.to(other_device(device))
    expect = []
    if bad == "rank":
        expect = [Raises(RuntimeError, "affine_grid_sample_backward: grad must be 4-D")]
    elif bad in ("n", "c"):
        expect = [
            Raises(
                RuntimeError, r"affine_grid_sample_backward: grad must have shape \[N, C, Ho, Wo\]"
            )
        ]
    elif bad == "device":
        expect = [
            Raises(RuntimeError, "affine_grid_sample_backward: grad must be on the input's device")
        ]
    names = list(MODES)[mode], list(PADDING_MODES)[padding]

    def reference():
        return _grads(
            affine_grid_sample_ref,
            x.double(),
            theta.double(),
            (Ho, Wo),
            *names,
            align,
            grad.double(),
        )

    def compare(actual, expected):
        (gx, gt), (rx, rt) = actual, expected
        assert gx.dtype == dtype and gt.dtype == theta.dtype and gx.shape == x.shape
        torch.testing.assert_close(
            gx.double().cpu(), rx.double().cpu(), equal_nan=True, **TOLERANCES[dtype]
        )
        assert_theta_grad_close(gt, rt, shape, Ho, Wo)

    check_op(
        lambda: op(grad, x, theta, mode, padding, align, [True, True]), reference, expect, compare
    )
