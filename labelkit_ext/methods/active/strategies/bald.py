"""MC-dropout BALD and greedy BatchBALD (Houlsby et al. 2011; Kirsch et al., NeurIPS 2019).

BALD scores each sample alone: ``I(y; w) = H(mean_s p_s) - mean_s H(p_s)`` over S dropout
samples. A top-k BALD batch is often redundant (near-duplicates score alike); BatchBALD picks
greedily the sample with the largest gain in *joint* mutual information with the batch so far,
``H(y_n | y_batch) - mean_s H(p_s(y_n))``.

``H(y_n | y_batch)`` is estimated with M sampled label configurations of the batch: each
carries the posterior weight of every dropout sample given its labels, ``w[s, m]``, and
``P(y_n | config m) = sum_s w[s, m] p_s(y_n)``. After a pick, each configuration draws a label
for it from that predictive and reweights. With one configuration and uniform weights the
first pick is the BALD maximum.
"""

from __future__ import annotations

import torch

from labelkit_ext.methods.active.strategies.base import (
    SelectionContext,
    Strategy,
    register_strategy,
    top_unlabeled,
)
from labelkit_ext.ops.scoring import uncertainty

__all__ = ["BaldStrategy", "BatchBaldStrategy", "batchbald_greedy"]

# Predictive rows scored per chunk in BatchBALD (M x chunk x C doubles at a time).
_CHUNK_ELEMENTS = 1 << 24


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def batchbald_greedy(
    mc_probs: torch.Tensor, budget: int, num_configs: int, generator: torch.Generator
) -> torch.Tensor:
    """Greedy BatchBALD over ``mc_probs`` (S, U, C); returns ``budget`` row indices in pick order."""
    p = mc_probs.double()
    S, U, C = p.shape
    expected_entropy = _entropy(p).mean(0)  # mean_s H(p_s(y_n)), (U,)
    weights = torch.full((S, 1), 1.0 / S, dtype=p.dtype, device=p.device)
    taken = torch.zeros(U, dtype=torch.bool, device=p.device)
    picks: list[int] = []
    for _ in range(min(budget, U)):
        M = weights.shape[1]
        chunk = max(1, _CHUNK_ELEMENTS // (M * C))
        gain = torch.empty(U, dtype=p.dtype, device=p.device)
        for start in range(0, U, chunk):
            q = torch.einsum("sm,snc->mnc", weights, p[:, start : start + chunk])
            gain[start : start + chunk] = _entropy(q).mean(0)
        gain = gain - expected_entropy
        gain[taken] = -torch.inf
        n = int(torch.argmax(gain))
        picks.append(n)
        taken[n] = True
        # Each configuration draws y_n from its predictive; M grows to num_configs by replication.
        parents = torch.arange(num_configs, device=p.device) % M
        w = weights[:, parents]
        predictive = (w.T @ p[:, n]).clamp_min(0)  # (num_configs, C)
        labels = torch.multinomial(
            predictive.cpu().float() + 1e-12, 1, generator=generator
        ).squeeze(1)
        w = w * p[:, n, labels.to(p.device)]
        weights = w / w.sum(0, keepdim=True).clamp_min(1e-300)
    return torch.tensor(picks, dtype=torch.long)


@register_strategy
class BaldStrategy(Strategy):
    """Top-k BALD mutual information over the MC-dropout samples."""

    name = "bald"
    needs = ("mc_logits",)

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        mc = ctx.require("mc_logits", self.name)
        return top_unlabeled(uncertainty(mc[:, ctx.unlabeled()], "bald", from_logits=True), ctx)


@register_strategy
class BatchBaldStrategy(Strategy):
    """Greedy BatchBALD among the ``candidates`` unlabeled samples of highest BALD, with
    ``num_configs`` sampled label configurations."""

    name = "batchbald"
    needs = ("mc_logits",)

    def __init__(self, candidates: int = 1000, num_configs: int = 512) -> None:
        if candidates < 1 or num_configs < 1:
            raise ValueError(
                f"candidates and num_configs must be >= 1, got {candidates}, {num_configs}"
            )
        self.candidates = candidates
        self.num_configs = num_configs

    def params(self) -> dict:
        return {"candidates": self.candidates, "num_configs": self.num_configs}

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        mc = ctx.require("mc_logits", self.name)
        unlabeled = ctx.unlabeled()
        bald = uncertainty(mc[:, unlabeled], "bald", from_logits=True)
        keep = max(self.candidates, ctx.budget)
        pool = top_unlabeled(bald, ctx, keep)  # pool indices, most informative first
        probs = mc[:, pool].float().softmax(dim=-1)
        rows = batchbald_greedy(probs, ctx.budget, self.num_configs, ctx.generator())
        return pool[rows.to(pool.device)]
