"""``density``: information density (Settles & Craven, 2008), uncertainty x representativeness^beta.

Representativeness is the mean cosine similarity of a sample to the pool, mapped from [-1, 1]
to [0, 1], streamed by ``cosine_reduce(..., 'mean')`` without an N x N matrix. Above
``max_references`` pool samples the mean is taken over a seeded random subset of that size,
which keeps a million-sample pool at N x max_references similarity work; under torchrun the
references are split over the ranks.
"""

from __future__ import annotations

import torch

from labelkit_ext.distributed import sharded_cosine_reduce
from labelkit_ext.errors import UsageError
from labelkit_ext.methods.active.strategies.base import (
    SelectionContext,
    Strategy,
    register_strategy,
    top_unlabeled,
)
from labelkit_ext.ops.scoring import uncertainty

__all__ = ["DensityStrategy", "representativeness"]

DEFAULT_MAX_REFERENCES = 20_000


def representativeness(ctx: SelectionContext, strategy: str, max_references: int) -> torch.Tensor:
    """(U,) in [0, 1]: (1 + mean cosine similarity to the pool's samples) / 2."""
    embeddings = ctx.require("embeddings", strategy)
    references = embeddings
    if embeddings.shape[0] > max_references:
        pick = torch.randperm(embeddings.shape[0], generator=ctx.generator())[:max_references]
        references = embeddings[pick.to(embeddings.device)]
    mine = references[ctx.shard(len(references))]
    mean = sharded_cosine_reduce(embeddings[ctx.unlabeled()], mine, "mean", dist_info=ctx.dist_info)
    return (1.0 + mean) / 2.0


@register_strategy
class DensityStrategy(Strategy):
    """``uncertainty(logits, method) * representativeness ** beta``: uncertain samples from
    dense regions first, not outliers. ``beta = 0`` is plain uncertainty sampling."""

    name = "density"
    needs = ("logits", "embeddings")

    def __init__(
        self,
        beta: float = 1.0,
        density_uncertainty: str = "entropy",
        max_references: int = DEFAULT_MAX_REFERENCES,
    ) -> None:
        if beta < 0:
            raise UsageError(f"beta must be >= 0, got {beta}")
        if density_uncertainty not in ("entropy", "margin", "least_confidence"):
            raise UsageError(
                "density_uncertainty must be 'entropy', 'margin' or 'least_confidence', "
                f"got {density_uncertainty!r}"
            )
        if max_references < 1:
            raise UsageError(f"max_references must be >= 1, got {max_references}")
        self.beta = beta
        self.method = density_uncertainty
        self.max_references = max_references

    def params(self) -> dict:
        return {
            "beta": self.beta,
            "uncertainty": self.method,
            "max_references": self.max_references,
        }

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        logits = ctx.require("logits", self.name)
        score = uncertainty(logits[ctx.unlabeled()], self.method, from_logits=True)
        if self.beta > 0:
            rep = representativeness(ctx, self.name, self.max_references)
            score = score * rep.to(score.dtype).pow(self.beta)
        return top_unlabeled(score, ctx)
