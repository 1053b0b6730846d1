"""``similarity``: query what the labeled set represents least (lowest cosine similarity to
its nearest labeled sample), one streamed ``cosine_reduce`` over labeled keys (split over the
ranks under torchrun)."""

from __future__ import annotations

import torch

from labelkit_ext.distributed import sharded_cosine_reduce
from labelkit_ext.methods.active.strategies.base import (
    SelectionContext,
    Strategy,
    register_strategy,
    top_unlabeled,
)

__all__ = ["SimilarityStrategy", "labeled_similarity"]


def labeled_similarity(ctx: SelectionContext, strategy: str) -> torch.Tensor:
    """(U,) cosine similarity of every unlabeled sample to its nearest labeled sample."""
    embeddings = ctx.require("embeddings", strategy)
    if len(ctx.labeled) == 0:
        raise ValueError(f"strategy {strategy!r} needs at least one labeled sample")
    keys = embeddings[ctx.labeled.to(embeddings.device)]
    mine = keys[ctx.shard(len(keys))]
    return sharded_cosine_reduce(embeddings[ctx.unlabeled()], mine, "max", dist_info=ctx.dist_info)


@register_strategy
class SimilarityStrategy(Strategy):
    """The unlabeled samples least similar to the labeled set (novelty / coverage)."""

    name = "similarity"
    needs = ("embeddings",)

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        return top_unlabeled(-labeled_similarity(ctx, self.name), ctx)
