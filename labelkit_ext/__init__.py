"""labelkit_ext: fused PyTorch ops (C++/CUDA) and thin training modules for label-efficient
deep learning.

Every op runs its compiled kernel when this build has one for the tensor's device, and its
pure-PyTorch reference (``labelkit_ext.reference``) otherwise; ``labelkit_ext.info()`` says which.
"""

from labelkit_ext._ext import BUILD_INFO, HAS_OPS, LOAD_ERROR
from labelkit_ext._info import info
from labelkit_ext.ops.affine import affine_grid_sample
from labelkit_ext.ops.entropy import EntropyGate, entropy_gate, max_entropy_loss, softmax_entropy
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

__version__ = "0.1.0"

__all__ = [
    "BUILD_INFO",
    "HAS_OPS",
    "LOAD_ERROR",
    "affine_grid_sample",
    "badge_select",
    "context_pair",
    "cosine_reduce",
    "cosine_topk",
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
    "rotate90",
    "softmax_entropy",
    "TopK",
    "uncertainty",
    "__version__",
]
