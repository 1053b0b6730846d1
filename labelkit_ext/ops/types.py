"""Result types of the ops, shared by the wrappers and the references."""

from __future__ import annotations

from typing import NamedTuple

import torch


class EntropyGate(NamedTuple):
    """Output of :func:`labelkit_ext.entropy_gate` for logits ``[N, C]``.

    entropy:       ``[N]`` float32 (float64 for float64 logits), natural log.
    uncertain:     ``[N]`` bool, ``entropy >= threshold``.
    prediction:    ``[N]`` int64 argmax (the first index wins ties; a NaN row points at its
                   first NaN, as ``torch.argmax``).
    cluster_probs: ``[N, S]`` softmax mass summed per cluster, or None without ``clusters``.
    cluster:       ``[N]`` int64 argmax of ``cluster_probs``, or None without ``clusters``.
    """

    entropy: torch.Tensor
    uncertain: torch.Tensor
    prediction: torch.Tensor
    cluster_probs: torch.Tensor | None
    cluster: torch.Tensor | None


class TopK(NamedTuple):
    """Output of :func:`labelkit_ext.cosine_topk` for queries ``[N, D]`` and keys ``[M, D]``.

    values:  ``[N, k]`` cosine similarities, best first (float32; float64 for float64 inputs).
    indices: ``[N, k]`` int64 key indices; equal values keep the lower key index first.
    """

    values: torch.Tensor
    indices: torch.Tensor
