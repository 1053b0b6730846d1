"""Scalar arguments of the public ops: numbers as users hold them (Python, NumPy) become the
Python ``int`` / ``float`` the op schemas take; anything else is the caller's error to name."""

from __future__ import annotations

import numbers
import operator

import numpy as np
import torch


def as_int(value: object) -> int | None:
    """``value`` as a Python int if it is an integer (``int``, ``np.int64``, anything with
    ``__index__``), else None. Bools and tensors are not ints here; a SymInt (a traced size)
    passes through unchanged."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, (bool, np.bool_, torch.Tensor)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def ints_where_possible(*values: object) -> tuple:
    """Each value as a Python int where :func:`as_int` takes it, else unchanged (so the caller's
    error message shows what the user passed)."""
    converted = (as_int(value) for value in values)
    return tuple(v if c is None else c for v, c in zip(values, converted, strict=True))


def is_finite(value: float) -> bool:
    """``math.isfinite``, also of the symbolic floats ``torch.compile(dynamic=True)`` makes of
    float arguments (it cannot trace ``math.isfinite`` of one): inf - inf and NaN - NaN are NaN."""
    return value - value == 0


def as_float(value: object) -> float | None:
    """``value`` as a Python float if it is a real number (``int``, ``float``, ``np.float32``,
    ...), else None. Bools and tensors are not numbers here."""
    if isinstance(value, (bool, np.bool_, torch.Tensor)) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def reads_data(tensor: torch.Tensor) -> bool:
    """Whether an eager check may read ``tensor``'s values (a device sync): not while
    torch.compile traces, and not on the meta device (shapes without data, as the fake kernels
    see them). The kernels check what such a check would have caught."""
    return not torch.compiler.is_compiling() and tensor.device.type != "meta"
