"""Autograd shared by the op families: the registered backward ops are once-differentiable."""

from __future__ import annotations

from collections.abc import Callable


def no_double_backward(ops: str, reference: str) -> Callable[..., None]:
    """The autograd formula of a backward op that has no derivative of its own: a double backward
    through it (``create_graph=True``, then a gradient of that gradient) raises, instead of the
    silent zeros PyTorch's fallback gives an op without one. ``reference`` names the plain
    PyTorch function that does support it."""

    def raise_clear_error(ctx, *grads) -> None:
        raise RuntimeError(
            f"labelkit_ext: {ops}: a double backward (create_graph=True, then a gradient of that "
            f"gradient) is not implemented by the compiled kernels. For higher-order gradients "
            f"use {reference} (plain PyTorch, differentiable twice)"
        )

    return raise_clear_error
