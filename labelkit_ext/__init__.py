"""labelkit_ext: fused PyTorch ops (C++/CUDA) and thin training modules for label-efficient
deep learning.

Every op runs its compiled kernel when this build has one for the tensor's device, and its
pure-PyTorch reference (``labelkit_ext.reference``) otherwise; ``labelkit_ext.info()`` says which.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module defining it. Imported on first use (PEP 562), so `labelkit --help`
# and `labelkit info` start without importing torch (seconds); `from labelkit_ext import X`
# and `labelkit_ext.X` behave as eager imports would.
_EXPORTS = {
    "BUILD_INFO": "_ext",
    "HAS_OPS": "_ext",
    "LOAD_ERROR": "_ext",
    "info": "_info",
    "CpuCacheStats": "memory",
    "cpu_cache_stats": "memory",
    "empty_cpu_cache": "memory",
    "set_cpu_cache_limit": "memory",
    "register_ops": "ops",
    "affine_grid_sample": "ops.affine",
    "EntropyGate": "ops.entropy",
    "entropy_gate": "ops.entropy",
    "max_entropy_loss": "ops.entropy",
    "softmax_entropy": "ops.entropy",
    "HammingStats": "ops.pretext",
    "PretextBatch": "ops.pretext",
    "context_pair": "ops.pretext",
    "hamming_distance_stats": "ops.pretext",
    "hamming_permutations": "ops.pretext",
    "jigsaw_tiles": "ops.pretext",
    "make_pretext_batch": "ops.pretext",
    "rotate90": "ops.pretext",
    "TopK": "ops.scoring",
    "badge_select": "ops.scoring",
    "cosine_reduce": "ops.scoring",
    "cosine_topk": "ops.scoring",
    "kcenter_greedy": "ops.scoring",
    "uncertainty": "ops.scoring",
}

if TYPE_CHECKING:  # what static analysers and IDEs see
    from labelkit_ext._ext import BUILD_INFO, HAS_OPS, LOAD_ERROR
    from labelkit_ext._info import info
    from labelkit_ext.memory import (
        CpuCacheStats,
        cpu_cache_stats,
        empty_cpu_cache,
        set_cpu_cache_limit,
    )
    from labelkit_ext.ops import register_ops
    from labelkit_ext.ops.affine import affine_grid_sample
    from labelkit_ext.ops.entropy import (
        EntropyGate,
        entropy_gate,
        max_entropy_loss,
        softmax_entropy,
    )
    from labelkit_ext.ops.pretext import (
        HammingStats,
        PretextBatch,
        context_pair,
        hamming_distance_stats,
        hamming_permutations,
        jigsaw_tiles,
        make_pretext_batch,
        rotate90,
    )
    from labelkit_ext.ops.scoring import (
        TopK,
        badge_select,
        cosine_reduce,
        cosine_topk,
        kcenter_greedy,
        uncertainty,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None and not name.startswith("__"):
        # Submodules (labelkit_ext.methods, ...) import on first attribute access too.
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups (and torch.compile) see a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "BUILD_INFO",
    "HAS_OPS",
    "LOAD_ERROR",
    "affine_grid_sample",
    "badge_select",
    "context_pair",
    "cosine_reduce",
    "cosine_topk",
    "cpu_cache_stats",
    "CpuCacheStats",
    "empty_cpu_cache",
    "entropy_gate",
    "EntropyGate",
    "hamming_distance_stats",
    "hamming_permutations",
    "HammingStats",
    "info",
    "jigsaw_tiles",
    "kcenter_greedy",
    "make_pretext_batch",
    "max_entropy_loss",
    "PretextBatch",
    "register_ops",
    "rotate90",
    "set_cpu_cache_limit",
    "softmax_entropy",
    "TopK",
    "uncertainty",
    "__version__",
]
