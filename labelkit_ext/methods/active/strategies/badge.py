"""``badge``: k-means++ seeding on gradient embeddings (Ash et al., ICLR 2020)."""

from __future__ import annotations

import torch

from labelkit_ext.distributed import sharded_badge_select
from labelkit_ext.engine import derive_seed
from labelkit_ext.methods.active.strategies.base import (
    SelectionContext,
    Strategy,
    register_strategy,
)

__all__ = ["BadgeStrategy"]


@register_strategy
class BadgeStrategy(Strategy):
    """Uncertain (large last-layer gradient) and diverse (k-means++ spread) at once, on the
    unlabeled pool; the draws are seeded by (seed, round)."""

    name = "badge"
    needs = ("logits", "embeddings")

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        logits = ctx.require("logits", self.name)
        embeddings = ctx.require("embeddings", self.name)
        unlabeled = ctx.unlabeled()
        mine = unlabeled[ctx.shard(unlabeled.numel())]
        probs = logits[mine].float().softmax(dim=1)
        budget = min(ctx.budget, unlabeled.numel())
        seed = derive_seed(ctx.seed, ctx.round)
        picks = sharded_badge_select(
            probs, embeddings[mine].float(), budget, seed, dist_info=ctx.dist_info
        )
        return unlabeled[picks.to(unlabeled.device)]
