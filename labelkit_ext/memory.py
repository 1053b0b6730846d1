"""The CPU output cache: large outputs of our CPU kernels reuse freed blocks.

A fresh block of more than 32 MiB comes from the operating system on every call (glibc maps it
and unmaps it on free), so the kernel faults in and zeroes every page before our op writes it:
for a 108 MiB batch of jigsaw tiles, a third of the op's time. Outputs of 4 MiB or
more therefore come from a cache of freed blocks, as CUDA tensors do with torch's caching
allocator: a block freed by one call serves the next call's output of a similar size (at most
twice the request). The cache holds at most ``limit_bytes`` of free blocks (oldest dropped
first): 1 GiB by default, set by ``LABELKIT_CPU_CACHE_MB`` at start-up or
:func:`set_cpu_cache_limit` later; 0 turns it off. :func:`empty_cpu_cache` gives every free
block back to the OS, like ``torch.cuda.empty_cache``.

Only the compiled CPU kernels use it; without the extension these functions report an empty
cache with limit 0.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from labelkit_ext import _ext

__all__ = ["CpuCacheStats", "cpu_cache_stats", "empty_cpu_cache", "set_cpu_cache_limit"]


@dataclass(frozen=True)
class CpuCacheStats:
    """What the CPU output cache holds (bytes are block capacities, multiples of 2 MiB)."""

    cached_bytes: int  #: free blocks waiting for reuse
    cached_blocks: int
    in_use_bytes: int  #: blocks behind live output tensors
    limit_bytes: int  #: the most ``cached_bytes`` may reach
    hits: int  #: outputs served by a cached block
    misses: int  #: outputs that needed a new block


def cpu_cache_stats() -> CpuCacheStats:
    """The cache's current contents and counters."""
    if not _ext.HAS_OPS:
        return CpuCacheStats(0, 0, 0, 0, 0, 0)
    return CpuCacheStats(*torch.ops.labelkit.cpu_cache_stats())


def set_cpu_cache_limit(limit_bytes: int) -> int:
    """Limit the bytes of free blocks kept for reuse (0 keeps none); blocks over the new limit are
    freed at once, oldest first. Returns the previous limit."""
    try:
        limit = operator.index(limit_bytes)
    except TypeError:
        raise TypeError(
            f"set_cpu_cache_limit: limit_bytes must be an int, got {type(limit_bytes).__name__}"
        ) from None
    if limit < 0:
        raise ValueError(f"set_cpu_cache_limit: limit_bytes must be >= 0, got {limit}")
    if not _ext.HAS_OPS:
        return 0
    return int(torch.ops.labelkit.set_cpu_cache_limit(limit))


def empty_cpu_cache() -> int:
    """Free every cached block (live outputs are untouched); returns the bytes freed."""
    if not _ext.HAS_OPS:
        return 0
    return int(torch.ops.labelkit.empty_cpu_cache())
