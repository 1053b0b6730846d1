"""``coreset``: k-center greedy on the embeddings (Sener & Savarese, ICLR 2018)."""

from __future__ import annotations

import torch

from labelkit_ext.distributed import sharded_kcenter_greedy
from labelkit_ext.errors import UsageError
from labelkit_ext.methods.active.strategies.base import (
    SelectionContext,
    Strategy,
    register_strategy,
)

__all__ = ["CoreSetStrategy"]


@register_strategy
class CoreSetStrategy(Strategy):
    """Each pick is the pool sample farthest from everything labeled or picked so far: the
    batch covers the pool with the smallest radius. ``metric``: 'euclidean' or 'cosine'."""

    name = "coreset"
    needs = ("embeddings",)

    def __init__(self, metric: str = "euclidean") -> None:
        if metric not in ("euclidean", "cosine"):
            raise UsageError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
        self.metric = metric

    def params(self) -> dict:
        return {"metric": self.metric}

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        embeddings = ctx.require("embeddings", self.name)
        budget = min(ctx.budget, ctx.pool_size - len(ctx.labeled))
        labeled = ctx.labeled.to(embeddings.device)
        mine = embeddings[ctx.shard(ctx.pool_size)]
        return sharded_kcenter_greedy(
            mine, budget, labeled, metric=self.metric, dist_info=ctx.dist_info
        )
