"""``random``: uniform sampling of the unlabeled pool, the baseline every strategy must beat."""

from __future__ import annotations

import torch

from labelkit_ext.methods.active.strategies.base import (
    SelectionContext,
    Strategy,
    register_strategy,
)


@register_strategy
class RandomStrategy(Strategy):
    """``budget`` unlabeled indices drawn without replacement, seeded by (seed, round)."""

    name = "random"
    needs = ()

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        unlabeled = ctx.unlabeled().cpu()
        order = torch.randperm(unlabeled.numel(), generator=ctx.generator())
        return unlabeled[order[: ctx.budget]]
