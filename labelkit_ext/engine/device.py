"""Device selection: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``."""

from __future__ import annotations

import re

import torch

from labelkit_ext.engine.distributed import current_dist
from labelkit_ext.errors import UsageError

__all__ = ["check_device_spec", "select_device"]


_DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_spec(spec: object) -> str:
    """``spec`` if it is a device this package accepts, else a UsageError saying which are:
    checked where a config is made, before any data is loaded."""
    if not isinstance(spec, str) or not _DEVICE_SPEC.fullmatch(spec):
        raise UsageError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    return spec


def select_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device for ``spec``; ``auto`` is CUDA when visible, else CPU. Under DDP a bare
    ``cuda`` (or ``auto`` with GPUs) means this process's GPU, ``cuda:<local_rank>``
    (``local_rank`` defaults to this process's under torchrun, 0 otherwise)."""
    check_device_spec(spec)
    if local_rank is None:
        local_rank = current_dist().local_rank
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"device {spec!r} requested but no CUDA GPU is visible; use --device cpu")
    device = torch.device(f"cuda:{local_rank}") if spec == "cuda" else torch.device(spec)
    if device.index >= torch.cuda.device_count():
        raise UsageError(f"device {spec!r}: only {torch.cuda.device_count()} GPU(s) visible")
    return device
