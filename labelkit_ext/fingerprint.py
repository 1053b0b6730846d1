"""Short digests that identify data, for the resume checks of the engine (``run_identity``)."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["module_digest", "tensor_digest"]


def tensor_digest(values: torch.Tensor) -> str:
    """A short hash of a tensor's dtype and values in order."""
    data = values.detach().cpu().contiguous()
    return hashlib.sha1(str(data.dtype).encode() + data.numpy().tobytes()).hexdigest()[:16]


def module_digest(module: torch.nn.Module | None) -> str | None:
    """A short hash of a module's state (names, dtypes, values); None for no module."""
    if module is None:
        return None
    digest = hashlib.sha1()
    for name, value in module.state_dict().items():
        digest.update(name.encode() + tensor_digest(value).encode())
    return digest.hexdigest()[:16]
