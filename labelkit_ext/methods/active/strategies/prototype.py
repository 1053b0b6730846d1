"""``prototype``: a few-shot metric classifier as a cheap probe (prototypical networks, Snell
et al. 2017). Each labeled class is the mean of its normalised embeddings; a sample sits
between classes when its cosine similarity to its nearest two prototypes is close. Those
samples are queried first. It needs no trained head and no softmax, only one ``cosine_topk``
of the pool against C prototypes."""

from __future__ import annotations

import torch

from labelkit_ext.methods.active.strategies.base import (
    SelectionContext,
    Strategy,
    register_strategy,
    top_unlabeled,
)
from labelkit_ext.ops.scoring import cosine_topk

__all__ = ["PrototypeStrategy", "class_prototypes"]


def class_prototypes(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(P, D): the normalised mean of the normalised ``embeddings`` of each label present."""
    x = torch.nn.functional.normalize(embeddings.float(), dim=1)
    classes, inverse = torch.unique(labels.to(x.device), return_inverse=True)
    sums = torch.zeros(len(classes), x.shape[1], device=x.device).index_add_(0, inverse, x)
    return torch.nn.functional.normalize(sums, dim=1)


@register_strategy
class PrototypeStrategy(Strategy):
    """Smallest prototype margin: ``cos(nearest) - cos(second nearest)`` (with one labeled
    class, the least similar to it)."""

    name = "prototype"
    needs = ("embeddings",)

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        embeddings = ctx.require("embeddings", self.name)
        if len(ctx.labeled) == 0:
            raise ValueError("strategy 'prototype' needs at least one labeled sample")
        prototypes = class_prototypes(embeddings[ctx.labeled.to(embeddings.device)], ctx.labels)
        top = cosine_topk(embeddings[ctx.unlabeled()].float(), prototypes, min(2, len(prototypes)))
        values = top.values
        gap = values[:, 0] - values[:, 1] if values.shape[1] == 2 else values[:, 0]
        return top_unlabeled(-gap, ctx)
