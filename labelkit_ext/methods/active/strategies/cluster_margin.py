"""``cluster-margin`` (Citovsky et al., NeurIPS 2021): cluster the pool's embeddings once, then
each round take the ``margin_multiple * budget`` lowest-margin unlabeled samples and pick from
them round-robin across clusters, smallest cluster first, the most uncertain of each cluster
first: uncertain and diverse at the cost of one margin pass per round.

The clustering is spherical k-means on our ops: k-center greedy (cosine) seeds the centres,
``cosine_topk(k=1)`` assigns every sample to its nearest centre, never an N x K matrix in
memory beyond the top-1. Under torchrun (a context with ``dist_info``) the ranks split the
seeding by samples and every assignment by centres (``labelkit_ext.distributed``), with one
process's result. It is kept in ``state_dict`` so a resumed run uses the same clusters.
"""

from __future__ import annotations

import torch

from labelkit_ext.distributed import shard_bounds, sharded_cosine_topk, sharded_kcenter_greedy
from labelkit_ext.engine.distributed import DistInfo
from labelkit_ext.errors import UsageError
from labelkit_ext.methods.active.strategies.base import (
    SelectionContext,
    Strategy,
    register_strategy,
    top_unlabeled,
)
from labelkit_ext.ops.scoring import uncertainty

__all__ = ["ClusterMarginStrategy", "round_robin", "spherical_kmeans"]


def spherical_kmeans(
    x: torch.Tensor, num_clusters: int, iterations: int = 20, dist_info: DistInfo | None = None
) -> torch.Tensor:
    """(N,) int64 cluster ids of the rows of ``x`` (N, D) by cosine k-means, deterministic.

    ``dist_info`` of several ranks (each holding all of ``x``, every rank must call): each rank
    seeds from its share of the rows and assigns every row to its share of the centres; the ids
    are one process's. Without it, no collective.
    """
    info = dist_info or DistInfo()
    n = x.shape[0]
    if not 1 <= num_clusters <= n:
        raise UsageError(f"num_clusters must be in [1, {n}], got {num_clusters}")
    x = torch.nn.functional.normalize(x.float(), dim=1)
    rows = slice(*shard_bounds(n, info))
    seeds = sharded_kcenter_greedy(x[rows], num_clusters, metric="cosine", dist_info=info)
    centres = x[seeds.to(x.device)]
    own = slice(*shard_bounds(num_clusters, info))
    assign = torch.full((n,), -1, dtype=torch.long, device=x.device)
    for _ in range(iterations):
        new = sharded_cosine_topk(x, centres[own], 1, dist_info=info).indices[:, 0]
        if torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_clusters)
        filled = counts > 0  # an emptied cluster keeps its centre
        centres[filled] = torch.nn.functional.normalize(sums[filled], dim=1)
    return assign


def round_robin(candidates: torch.Tensor, clusters: torch.Tensor, budget: int) -> torch.Tensor:
    """Pick ``budget`` of ``candidates`` (ordered most wanted first; ``clusters`` their cluster
    ids) one per cluster in turn, clusters with fewer candidates first."""
    groups: dict[int, list[int]] = {}
    for index, cluster in zip(candidates.tolist(), clusters.tolist(), strict=True):
        groups.setdefault(cluster, []).append(index)
    order = sorted(groups, key=lambda c: (len(groups[c]), c))
    picks: list[int] = []
    depth = 0
    while len(picks) < budget:
        took = False
        for cluster in order:
            members = groups[cluster]
            if depth < len(members) and len(picks) < budget:
                picks.append(members[depth])
                took = True
        if not took:
            break
        depth += 1
    return torch.tensor(picks, dtype=torch.long)


@register_strategy
class ClusterMarginStrategy(Strategy):
    """Margin uncertainty, diversified round-robin over ``num_clusters`` embedding clusters
    (default: the query size) computed at the first selection."""

    name = "cluster-margin"
    needs = ("logits", "embeddings")

    def __init__(self, num_clusters: int | None = None, margin_multiple: float = 10.0) -> None:
        if num_clusters is not None and num_clusters < 1:
            raise UsageError(f"num_clusters must be >= 1, got {num_clusters}")
        if margin_multiple < 1:
            raise UsageError(f"margin_multiple must be >= 1, got {margin_multiple}")
        self.num_clusters = num_clusters
        self.margin_multiple = margin_multiple
        self.clusters: torch.Tensor | None = None

    def params(self) -> dict:
        return {"num_clusters": self.num_clusters, "margin_multiple": self.margin_multiple}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.clusters is None else {"clusters": self.clusters.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.clusters = state.get("clusters")

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        logits = ctx.require("logits", self.name)
        embeddings = ctx.require("embeddings", self.name)
        if self.clusters is None:
            # The default follows the query, which may outgrow a small pool; an explicit
            # num_clusters above the pool is refused by spherical_kmeans, never cut silently.
            k = self.num_clusters or min(ctx.budget, ctx.pool_size)
            self.clusters = spherical_kmeans(embeddings, k, dist_info=ctx.dist_info).cpu()
        elif self.clusters.shape != (ctx.pool_size,):
            raise UsageError(
                f"saved clusters cover {self.clusters.shape[0]} samples, the pool has {ctx.pool_size}"
            )
        unlabeled = ctx.unlabeled()
        margin = uncertainty(logits[unlabeled], "margin", from_logits=True)
        candidates = top_unlabeled(margin, ctx, int(self.margin_multiple * ctx.budget)).cpu()
        return round_robin(candidates, self.clusters[candidates], ctx.budget)
