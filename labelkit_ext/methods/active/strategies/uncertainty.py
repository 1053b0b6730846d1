"""Uncertainty sampling with one fused ``uncertainty`` op pass over the pool's logits:
entropy, margin, least confidence, and, over MC-dropout samples, variation ratio and mean std."""

from __future__ import annotations

import torch

from labelkit_ext.methods.active.strategies.base import (
    SelectionContext,
    Strategy,
    register_strategy,
    top_unlabeled,
)
from labelkit_ext.ops.scoring import uncertainty

__all__ = [
    "EntropyStrategy",
    "LeastConfidenceStrategy",
    "MarginStrategy",
    "MeanStdStrategy",
    "UncertaintyStrategy",
    "VariationRatioStrategy",
]


class UncertaintyStrategy(Strategy):
    """The ``budget`` unlabeled samples with the largest ``uncertainty(..., method)``."""

    method = ""
    source = "logits"  # or "mc_logits": the (S, N, C) Monte-Carlo dropout samples

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        scores = ctx.require(self.source, self.name)
        unlabeled = ctx.unlabeled()
        rows = scores.index_select(scores.dim() - 2, unlabeled)
        return top_unlabeled(uncertainty(rows, self.method, from_logits=True), ctx)


@register_strategy
class EntropyStrategy(UncertaintyStrategy):
    """Predictive entropy ``-sum p log p``."""

    name, method = "entropy", "entropy"


@register_strategy
class MarginStrategy(UncertaintyStrategy):
    """Smallest gap between the two most probable classes."""

    name, method = "margin", "margin"


@register_strategy
class LeastConfidenceStrategy(UncertaintyStrategy):
    """Lowest top-class probability."""

    name, method = "least-confidence", "least_confidence"


@register_strategy
class VariationRatioStrategy(UncertaintyStrategy):
    """``1 - f_mode / S``: disagreement of the argmax over MC-dropout samples."""

    name, method, source = "variation-ratio", "variation_ratio", "mc_logits"
    needs = ("mc_logits",)


@register_strategy
class MeanStdStrategy(UncertaintyStrategy):
    """Mean over classes of the std of the probabilities over MC-dropout samples."""

    name, method, source = "mean-std", "mean_std", "mc_logits"
    needs = ("mc_logits",)
