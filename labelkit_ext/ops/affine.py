"""Fused per-sample affine grid-sample: ``affine_grid_sample`` (the STN warp).

Equal to ``F.grid_sample(input, F.affine_grid(theta, (N, C, Ho, Wo)), ...)`` without writing the
``[N, Ho, Wo, 2]`` grid: each output pixel computes its source coordinate from θ on the fly.
The backward is its own registered op: the input gradient is a deterministic gather (every input
pixel collects from the output pixels whose footprint covers it, found through the inverse of
the affine map; no atomics), and θ's gradient a per-sample reduction of fixed order.

The public wrapper validates its arguments (same messages as the C++ ``TORCH_CHECK``s), then
calls ``torch.ops.labelkit.affine_grid_sample`` when this build has a kernel for the input's
device and the pure-PyTorch reference otherwise; the branch depends only on static facts, so
``torch.compile(fullgraph=True)`` traces it.

Autocast: not registered on purpose. The op reads float16/bfloat16 as they are, computes in
float32 and returns the input's dtype (an autocast "fp32" op would add a cast copy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from labelkit_ext._ext import HAS_OPS, has_kernel
from labelkit_ext.ops._args import as_int
from labelkit_ext.ops._autograd import no_double_backward
from labelkit_ext.reference.affine import affine_grid_sample_ref

__all__ = ["affine_grid_sample", "MODES", "PADDING_MODES"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Interpolation modes and their codes in the C++ schema (PyTorch's grid_sampler numbering).
MODES = {"bilinear": 0, "nearest": 1}
#: Padding modes and their codes in the C++ schema.
PADDING_MODES = {"zeros": 0, "border": 1, "reflection": 2}

_OP = "affine_grid_sample"


# ---- argument checks ----------------------------------------------------------------------------


def _check_input(input: object) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{_OP}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{_OP}: input must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {input.dtype}"
        )
    if input.dim() != 4:
        raise ValueError(f"{_OP}: input must be 4-D [N, C, H, W], got shape {tuple(input.shape)}")
    if input.shape[2] < 1 or input.shape[3] < 1:
        raise ValueError(
            f"{_OP}: input must have H >= 1 and W >= 1, got shape {tuple(input.shape)}"
        )


def _check_theta(theta: object, input: torch.Tensor) -> None:
    if not isinstance(theta, torch.Tensor):
        raise TypeError(f"{_OP}: theta must be a torch.Tensor, got {type(theta).__name__}")
    if theta.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{_OP}: theta must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {theta.dtype}"
        )
    if (theta.dtype == torch.float64) != (input.dtype == torch.float64):
        raise ValueError(
            f"{_OP}: theta dtype {theta.dtype} does not match input dtype {input.dtype} "
            "(float64 must be used for both or neither)"
        )
    if theta.device != input.device:
        raise ValueError(
            f"{_OP}: theta must be on the input's device ({input.device}), got {theta.device}"
        )
    if theta.dim() != 3 or tuple(theta.shape[1:]) != (2, 3):
        raise ValueError(f"{_OP}: theta must have shape [N, 2, 3], got {tuple(theta.shape)}")
    N = input.shape[0]
    if theta.shape[0] not in (N, 1):
        raise ValueError(
            f"{_OP}: theta has {theta.shape[0]} matrices but input has N = {N} images "
            "(theta must be [N, 2, 3] or [1, 2, 3])"
        )


def check_size_spec(size: object, op: str = _OP) -> tuple[int, int] | None:
    """``size`` as None or ``(Ho, Wo)`` of positive ints (NumPy ints taken), before any input is
    seen: shared with ``nn.AffineWarp``."""
    if size is None:
        return None
    if not isinstance(size, (Sequence, np.ndarray)) or isinstance(size, str) or len(size) != 2:
        raise ValueError(f"{op}: size must be None or (Ho, Wo), got {size!r}")
    sides = tuple(as_int(s) for s in size)
    if any(s is None for s in sides):
        raise ValueError(f"{op}: size must hold two ints, got {size!r}")
    if not all(s > 0 for s in sides):
        raise ValueError(f"{op}: size entries must be positive, got {sides}")
    return sides


def _check_size(size: object, input: torch.Tensor) -> tuple[int, int]:
    size = check_size_spec(size)
    if size is None:
        return int(input.shape[2]), int(input.shape[3])
    N, C = input.shape[:2]
    if all(isinstance(v, int) for v in (*size, N, C)) and N * C * size[0] * size[1] >= 2**62:
        raise ValueError(
            f"{_OP}: size {tuple(size)} is too large: the output [N, C, Ho, Wo] = "
            f"[{N}, {C}, {size[0]}, {size[1]}] would have more than 2**62 elements"
        )
    return size[0], size[1]


def check_modes(mode: object, padding_mode: object, align_corners: object, op: str = _OP) -> None:
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {tuple(MODES)}, got {mode!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"{op}: padding_mode must be one of {tuple(PADDING_MODES)}, got {padding_mode!r}"
        )
    if not isinstance(align_corners, bool):
        raise ValueError(f"{op}: align_corners must be a bool, got {align_corners!r}")


# ---- public function ------------------------------------------------------------------------------


def affine_grid_sample(
    input: torch.Tensor,
    theta: torch.Tensor,
    size: Sequence[int] | None = None,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """Warp every image of ``input`` by its own affine matrix, in one pass.

    Equals ``F.grid_sample(input, F.affine_grid(theta, (N, C, Ho, Wo), align_corners), mode,
    padding_mode, align_corners)`` without materialising the grid.

    Args:
        input: ``[N, C, H, W]`` float16, bfloat16, float32 or float64; contiguous or
            channels-last (the output keeps the input's memory format).
        theta: ``[N, 2, 3]`` (or ``[1, 2, 3]``, shared by the batch) on the input's device,
            mapping normalised output coordinates to normalised input coordinates (the
            ``F.affine_grid`` convention). Any floating dtype, except that float64 goes with
            float64 input only; it is read in the computation dtype.
        size: ``(Ho, Wo)``, positive; None for the input's ``(H, W)``.
        mode: ``'bilinear'`` | ``'nearest'``.
        padding_mode: ``'zeros'`` | ``'border'`` | ``'reflection'``.
        align_corners: as in ``F.affine_grid`` / ``F.grid_sample``.

    Returns:
        ``[N, C, Ho, Wo]`` in the input's dtype (computed in float32; float64 for float64).

    Differentiable w.r.t. ``input`` and ``theta`` (θ's gradient is zero in ``'nearest'`` mode,
    as in PyTorch), once; the gradient of θ has θ's dtype. The backward uses no atomics and is
    deterministic, so it runs under ``torch.use_deterministic_algorithms(True)``.

    A sample whose θ holds NaN or ±inf samples nothing: its output (and its gradients) are zero
    for every padding mode; no memory outside the tensors is ever touched.
    """
    _check_input(input)
    _check_theta(theta, input)
    Ho, Wo = _check_size(size, input)
    check_modes(mode, padding_mode, align_corners)
    N = input.shape[0]
    theta = theta.expand(N, 2, 3)
    if has_kernel(_OP, input.device.type):
        return torch.ops.labelkit.affine_grid_sample(
            input, theta, Ho, Wo, MODES[mode], PADDING_MODES[padding_mode], align_corners
        )
    return affine_grid_sample_ref(input, theta, (Ho, Wo), mode, padding_mode, align_corners)


# ---- torch.library registrations (only when the compiled ops exist) ------------------------------


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """The output layout: channels-last when the input is, else contiguous (as the kernels)."""
    if (
        t.dim() == 4
        and t.is_contiguous(memory_format=torch.channels_last)
        and not t.is_contiguous()
    ):
        return torch.channels_last
    return torch.contiguous_format


def _register_fake_kernels() -> None:
    # The fake kernels check devices and the gradient's shape as the C++ kernels do (same
    # words): a meta tensor beside a real one dispatches here, and must not pass silently.
    @torch.library.register_fake("labelkit::affine_grid_sample")
    def _affine_grid_sample_fake(input, theta, out_h, out_w, mode, padding_mode, align_corners):
        torch._check(
            theta.device == input.device,
            lambda: (
                f"{_OP}: theta must be on the input's device ({input.device}), got {theta.device}"
            ),
        )
        N, C = input.shape[0], input.shape[1]
        return torch.empty(
            (N, C, out_h, out_w),
            dtype=input.dtype,
            device=input.device,
            memory_format=_memory_format(input),
        )

    @torch.library.register_fake("labelkit::_affine_grid_sample_backward")
    def _affine_grid_sample_backward_fake(
        grad, input, theta, mode, padding_mode, align_corners, output_mask
    ):
        op = f"{_OP}_backward"
        torch._check(
            grad.dim() == 4, lambda: f"{op}: grad must be 4-D, got shape {tuple(grad.shape)}"
        )
        torch._check(
            grad.shape[0] == input.shape[0] and grad.shape[1] == input.shape[1],
            lambda: (
                f"{op}: grad must have shape [N, C, Ho, Wo] = [{input.shape[0]}, "
                f"{input.shape[1]}, Ho, Wo], got {list(grad.shape)}"
            ),
        )
        torch._check(
            grad.device == input.device, lambda: f"{op}: grad must be on the input's device"
        )
        torch._check(
            theta.device == input.device,
            lambda: (
                f"{_OP}: theta must be on the input's device ({input.device}), got {theta.device}"
            ),
        )
        grad_input = (
            torch.empty_like(input, memory_format=_memory_format(input))
            if output_mask[0]
            else input.new_empty((0,))
        )
        grad_theta = (
            theta.new_empty((theta.shape[0], 2, 3)) if output_mask[1] else theta.new_empty((0,))
        )
        return grad_input, grad_theta


def _setup_context(ctx, inputs, output):
    input, theta, _h, _w, mode, padding_mode, align_corners = inputs
    ctx.save_for_backward(input, theta)
    ctx.args = (mode, padding_mode, align_corners)


def _backward(ctx, grad):
    input, theta = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_input, grad_theta = torch.ops.labelkit._affine_grid_sample_backward(
        grad, input, theta, *ctx.args, mask
    )
    return (
        grad_input if mask[0] else None,
        grad_theta if mask[1] else None,
        None,
        None,
        None,
        None,
        None,
    )


def _register_autograd() -> None:
    torch.library.register_autograd(
        "labelkit::affine_grid_sample", _backward, setup_context=_setup_context
    )
    torch.library.register_autograd(
        "labelkit::_affine_grid_sample_backward",
        no_double_backward(
            "affine_grid_sample", "labelkit_ext.reference.affine.affine_grid_sample_ref"
        ),
    )


# The schema is defined by _C; a build from before this op (stale _C) simply uses the reference.
if HAS_OPS and hasattr(torch.ops.labelkit, "affine_grid_sample"):
    _register_fake_kernels()
    _register_autograd()
