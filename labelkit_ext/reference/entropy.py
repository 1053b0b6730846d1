"""Reference implementations of the softmax-entropy op family in plain PyTorch."""

from __future__ import annotations

import math

import torch

from labelkit_ext.ops.types import EntropyGate


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed (and returned) in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_entropy_ref(
    logits: torch.Tensor, dim: int = -1, base: float | None = None
) -> torch.Tensor:
    """Shannon entropy of ``softmax(logits)`` along ``dim``.

    Uses ``H = logsumexp(d) - sum(softmax(d) * d)`` with ``d = logits - max`` (H is
    shift-invariant, and the shift keeps large logits from cancelling). ``-inf`` entries are
    masked classes contributing 0; a row that is all ``-inf`` or holds NaN/+inf gives NaN.
    """
    x = logits.to(accumulation_dtype(logits.dtype))
    d = x - x.amax(dim, keepdim=True).detach()
    p = torch.softmax(d, dim)
    # Classes with p == 0 (masked -inf logits, or finite ones so far below the max that d
    # overflows to -inf) contribute 0: zero their d so that 0 * -inf never appears.
    d_safe = torch.where(p.detach() > 0, d, torch.zeros_like(d))
    entropy = torch.logsumexp(d, dim) - (p * d_safe).sum(dim)
    return entropy if base is None else entropy / math.log(base)


def cluster_mass_ref(
    logits: torch.Tensor, clusters: torch.Tensor, num_clusters: int
) -> torch.Tensor:
    """Softmax mass of ``logits [N, C]`` summed per cluster id: ``[N, num_clusters]``."""
    p = torch.softmax(logits.to(accumulation_dtype(logits.dtype)), dim=-1)
    return p.new_zeros(p.shape[0], num_clusters).index_add(1, clusters, p)


def entropy_gate_ref(
    logits: torch.Tensor,
    threshold: float,
    clusters: torch.Tensor | None = None,
    num_clusters: int | None = None,
) -> EntropyGate:
    """Entropy gating of ``logits [N, C]``; see :func:`labelkit_ext.entropy_gate`."""
    entropy = softmax_entropy_ref(logits, dim=-1)
    prediction = logits.argmax(dim=-1)
    uncertain = entropy >= threshold
    if clusters is None:
        return EntropyGate(entropy, uncertain, prediction, None, None)
    if num_clusters is None:
        num_clusters = int(clusters.max()) + 1
    cluster_probs = cluster_mass_ref(logits, clusters, num_clusters)
    return EntropyGate(entropy, uncertain, prediction, cluster_probs, cluster_probs.argmax(dim=-1))
