"""Pool scoring sharded over ``torch.distributed`` ranks (launched with ``torchrun``).

Each rank holds one contiguous shard of the pool (``shard_bounds`` says which rows); the helpers
return the same answer on every rank, equal to the single-process op on the whole pool:

- ``sharded_cosine_topk`` / ``sharded_cosine_reduce``: keys sharded, queries replicated; the
  local top-k (reduction) is merged across ranks, ties still keeping the lower global index.
- ``sharded_kcenter_greedy`` / ``sharded_badge_select``: samples sharded; every pick is the local
  best followed by an all-gather of (value, global index) and a global argmax, and the winner's
  vector is broadcast by its owner. Communication per pick is O(world + D), never O(N).

The process group comes from :func:`labelkit_ext.engine.distributed.init_distributed` (gloo on
CPU, NCCL on GPUs). Without an initialised group (one process), or with ``dist_info`` of one
process, every helper is the plain op. Every rank must call a helper (they meet in
collectives), and errors are agreed: a NaN or inf in any rank's shard is a ValueError on every
rank, as bad sizes are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from labelkit_ext.engine.distributed import DistInfo, current_dist
from labelkit_ext.ops.scoring import (
    COSINE_EPS,
    badge_select,
    cosine_reduce,
    cosine_topk,
    kcenter_greedy,
)
from labelkit_ext.ops.types import TopK
from labelkit_ext.reference.entropy import accumulation_dtype
from labelkit_ext.reference.scoring import (
    badge_factors,
    badge_sq_dist,
    badge_uniforms,
    normalize_rows,
)

__all__ = [
    "shard_bounds",
    "sharded_cosine_topk",
    "sharded_cosine_reduce",
    "sharded_kcenter_greedy",
    "sharded_badge_select",
]


def shard_bounds(total: int, info: DistInfo | None = None) -> tuple[int, int]:
    """Rows ``[start, end)`` of a pool of ``total`` samples that this rank holds: contiguous,
    sizes differing by at most one, rank order = index order."""
    info = info or current_dist()
    base, extra = divmod(total, info.world_size)
    start = info.rank * base + min(info.rank, extra)
    return start, start + base + (1 if info.rank < extra else 0)


def _gather_scalars(values: list[float], device: torch.device, info: DistInfo) -> torch.Tensor:
    """[world, len(values)] float64: every rank's values, in rank order."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(out, mine)
    return torch.stack(out)


def _shard_layout(
    local: int, inputs: Sequence[torch.Tensor], op: str, info: DistInfo
) -> tuple[int, int]:
    """(global index of this rank's first row, pool size), from one all-gather that also
    carries whether every rank's ``inputs`` are finite: a NaN or inf on one rank is a ValueError
    on every rank (the plain op would raise on its owner alone and leave the others waiting in
    the next collective)."""
    finite = all(bool(torch.isfinite(t).all()) for t in inputs)
    table = _gather_scalars([float(local), float(finite)], inputs[0].device, info)
    if not bool(table[:, 1].all()):
        bad = [r for r in range(info.world_size) if not table[r, 1]]
        raise ValueError(f"{op}: the inputs must be finite (NaN or inf on rank(s) {bad})")
    sizes = table[:, 0].long().tolist()
    return sum(sizes[: info.rank]), sum(sizes)


def _from_owner(
    rows: torch.Tensor, owned: torch.Tensor, width: int, like: torch.Tensor
) -> torch.Tensor:
    """Rows held by different ranks, assembled on every rank: each owner writes its rows, the rest
    contribute zeros, and a SUM all-reduce adds exact zeros."""
    buf = like.new_zeros(owned.shape[0], width)
    buf[owned] = rows
    dist.all_reduce(buf)
    return buf


# ---- top-k and reductions over sharded keys -------------------------------------------------------


def sharded_cosine_topk(
    queries: torch.Tensor,
    keys_shard: torch.Tensor,
    k: int,
    largest: bool = True,
    *,
    eps: float = COSINE_EPS,
    tile_size: int | None = None,
    dist_info: DistInfo | None = None,
) -> TopK:
    """:func:`labelkit_ext.cosine_topk` of ``queries`` (same on every rank) over the keys of all
    ranks; indices are global (rank order). Every rank returns the full answer."""
    info = dist_info or current_dist()
    if not info.enabled:
        return cosine_topk(queries, keys_shard, k, largest, eps=eps, tile_size=tile_size)
    op = "sharded_cosine_topk"
    offset, total = _shard_layout(keys_shard.shape[0], [queries, keys_shard], op, info)
    if not 1 <= k <= total:
        raise ValueError(f"{op}: k={k} must lie in [1, M = {total}] (keys of all ranks)")
    local_k = min(k, keys_shard.shape[0])
    N = queries.shape[0]
    acc = accumulation_dtype(queries.dtype)
    fill = float("-inf") if largest else float("inf")
    values = torch.full((N, k), fill, dtype=acc, device=queries.device)
    indices = torch.full((N, k), total, dtype=torch.int64, device=queries.device)  # sorts last
    if local_k > 0:
        v, i = cosine_topk(queries, keys_shard, local_k, largest, eps=eps, tile_size=tile_size)
        values[:, :local_k] = v
        indices[:, :local_k] = i + offset
    all_v = [torch.empty_like(values) for _ in range(info.world_size)]
    all_i = [torch.empty_like(indices) for _ in range(info.world_size)]
    dist.all_gather(all_v, values)
    dist.all_gather(all_i, indices)
    cand_v, cand_i = torch.cat(all_v, 1), torch.cat(all_i, 1)
    # Rank order is index order and each block is sorted, so a stable sort keeps ties by index.
    order = torch.sort(cand_v, dim=1, descending=largest, stable=True).indices[:, :k]
    return TopK(cand_v.gather(1, order), cand_i.gather(1, order))


def sharded_cosine_reduce(
    queries: torch.Tensor,
    keys_shard: torch.Tensor,
    reduce: str = "max",
    *,
    eps: float = COSINE_EPS,
    tile_size: int | None = None,
    dist_info: DistInfo | None = None,
) -> torch.Tensor:
    """:func:`labelkit_ext.cosine_reduce` over the keys of all ranks (an empty shard is allowed)."""
    info = dist_info or current_dist()
    if not info.enabled:
        return cosine_reduce(queries, keys_shard, reduce, eps=eps, tile_size=tile_size)
    op = "sharded_cosine_reduce"
    _, total = _shard_layout(keys_shard.shape[0], [queries, keys_shard], op, info)
    if total == 0:
        raise ValueError(f"{op}: keys is empty on every rank (M == 0)")
    acc = accumulation_dtype(queries.dtype)
    local_reduce = "sum" if reduce == "mean" else reduce
    if keys_shard.shape[0] > 0:
        part = cosine_reduce(queries, keys_shard, local_reduce, eps=eps, tile_size=tile_size)
    else:
        neutral = {"max": float("-inf"), "min": float("inf")}.get(reduce, 0.0)
        part = torch.full((queries.shape[0],), neutral, dtype=acc, device=queries.device)
    op = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}.get(reduce, dist.ReduceOp.SUM)
    dist.all_reduce(part, op=op)
    return part / total if reduce == "mean" else part


# ---- greedy selections over sharded samples ---------------------------------------------------------


def _global_best(
    value: float, index: int, device: torch.device, info: DistInfo, largest: bool = True
) -> int:
    """The all-reduce of the argmax: best value over ranks, lowest global index on ties; -1 if no
    rank has a candidate (index < 0)."""
    pairs = _gather_scalars([value, float(index)], device, info).tolist()
    best_v, best_i = None, -1
    for v, i in pairs:
        if i < 0:
            continue
        better = (
            best_i < 0 or (v > best_v if largest else v < best_v) or (v == best_v and i < best_i)
        )
        if better:
            best_v, best_i = v, int(i)
    return best_i


def _local_best(
    values: torch.Tensor, available: torch.Tensor, offset: int, largest: bool = True
) -> tuple[float, int]:
    """(value, global index) of this shard's best available entry (first index on ties)."""
    if not bool(available.any()):
        return 0.0, -1
    fill = float("-inf") if largest else float("inf")
    masked = values.masked_fill(~available, fill)
    i = int(masked.argmax() if largest else masked.argmin())
    return float(masked[i]), i + offset


def _owned(global_idx: torch.Tensor, offset: int, local: int) -> torch.Tensor:
    return (global_idx >= offset) & (global_idx < offset + local)


def _check_global_labeled(labeled, total: int, op: str) -> list[int]:
    if labeled is None:
        return []
    idx = labeled.tolist() if isinstance(labeled, torch.Tensor) else list(labeled)
    if any(not 0 <= i < total for i in idx):
        raise ValueError(f"{op}: labeled indices must lie in [0, N = {total})")
    if len(set(idx)) != len(idx):
        raise ValueError(f"{op}: labeled indices must not repeat")
    return idx


def sharded_kcenter_greedy(
    embeddings_shard: torch.Tensor,
    budget: int,
    labeled: torch.Tensor | Sequence[int] | None = None,
    metric: str = "euclidean",
    *,
    eps: float = COSINE_EPS,
    dist_info: DistInfo | None = None,
) -> torch.Tensor:
    """:func:`labelkit_ext.kcenter_greedy` on the pool formed by every rank's shard (rank order).
    ``labeled`` holds global indices (the same on every rank); returns global indices."""
    info = dist_info or current_dist()
    if not info.enabled:
        return kcenter_greedy(embeddings_shard, budget, labeled, metric, eps=eps)
    op = "sharded_kcenter_greedy"
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"{op}: metric must be 'euclidean' or 'cosine', got {metric!r}")
    device = embeddings_shard.device
    x = (
        normalize_rows(embeddings_shard, eps)
        if metric == "cosine"
        else embeddings_shard.to(accumulation_dtype(embeddings_shard.dtype))
    )
    local, D = x.shape
    offset, total = _shard_layout(local, [embeddings_shard], op, info)
    lab = _check_global_labeled(labeled, total, op)
    if not 0 <= budget <= total - len(lab):
        raise ValueError(
            f"{op}: budget={budget} must lie in [0, {total - len(lab)}] (the unlabeled pool)"
        )
    picks: list[int] = []
    if budget == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    # Euclidean distances to the nearest center (the argmax is that of the squared ones).
    min_d = torch.full((local,), float("inf"), dtype=x.dtype, device=device)
    taken = torch.zeros(local, dtype=torch.bool, device=device)

    def add_centers(vecs: torch.Tensor) -> None:
        nonlocal min_d
        for block in vecs.split(_fold_block(local)):
            min_d = torch.minimum(min_d, _distances(x, block).amin(1))

    if lab:
        gidx = torch.tensor(lab, dtype=torch.int64, device=device)
        own = _owned(gidx, offset, local)
        taken[gidx[own] - offset] = True
        add_centers(_from_owner(x[gidx[own] - offset], own, D, x))
    else:
        mean = x.sum(0)
        dist.all_reduce(mean)
        mean = mean / total
        v, i = _local_best(
            (x - mean).square().sum(-1),
            torch.ones(local, dtype=torch.bool, device=device),
            offset,
            largest=False,
        )
        first = _global_best(v, i, device, info, largest=False)
        picks.append(first)
        _take_if_owned(taken, first, offset)
        add_centers(_center(x, first, offset, local)[None])
    while len(picks) < budget:
        v, i = _local_best(min_d, ~taken, offset)
        c = _global_best(v, i, device, info)
        picks.append(c)
        if len(picks) < budget:
            _take_if_owned(taken, c, offset)
            add_centers(_center(x, c, offset, local)[None])
    return torch.tensor(picks, dtype=torch.int64, device=device)


# Centers folded per block: a [local, block] distance tile of at most this many entries.
_FOLD_ENTRIES = 1 << 22


def _fold_block(rows: int) -> int:
    return max(1, min(1024, _FOLD_ENTRIES // max(rows, 1)))


def _distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """[N, K] Euclidean distances from coordinate differences (as the kcenter_greedy kernels
    compute them), not |a|^2 + |b|^2 - 2ab, which cancels for close points; one pass over x per
    block of centers instead of one per center."""
    return torch.cdist(x, centers, compute_mode="donot_use_mm_for_euclid_dist")


def _take_if_owned(taken: torch.Tensor, g: int, offset: int) -> None:
    if offset <= g < offset + taken.shape[0]:
        taken[g - offset] = True


def _center(rows: torch.Tensor, g: int, offset: int, local: int) -> torch.Tensor:
    """Row ``g`` (global) of a sharded matrix, on every rank."""
    own = torch.tensor([offset <= g < offset + local], device=rows.device)
    mine = rows[g - offset : g - offset + 1] if bool(own) else rows.new_zeros(0, rows.shape[1])
    return _from_owner(mine, own, rows.shape[1], rows)[0]


def _draw(
    weights: torch.Tensor, taken: torch.Tensor, u: float, offset: int, device, info: DistInfo
) -> int:
    """Inverse-CDF draw over the shards: the first global i with cumsum > u * total."""
    totals = _gather_scalars([float(weights.sum())], device, info)[:, 0].tolist()
    total = sum(totals)
    if not total > 0.0:  # no mass left: the lowest untaken global index
        free = (~taken).nonzero()
        mine = int(free[0]) + offset if free.numel() else -1
        return _global_best(0.0, mine, device, info)
    target = u * total
    before = 0.0
    owner = max(r for r, t in enumerate(totals) if t > 0)  # if u * total rounds past the end
    for r, t in enumerate(totals):
        if before + t > target:
            owner = r
            break
        before += t
    mine = -1
    if info.rank == owner:
        cdf = weights.cumsum(0)
        i = int(
            torch.searchsorted(
                cdf, torch.tensor([target - before], dtype=cdf.dtype, device=device), right=True
            )
        )
        if i >= weights.shape[0]:
            i = int(weights.nonzero()[-1])
        mine = i + offset
    return _global_best(0.0, mine, device, info)


def sharded_badge_select(
    probs_shard: torch.Tensor,
    embeddings_shard: torch.Tensor,
    budget: int,
    seed: int = 0,
    *,
    dist_info: DistInfo | None = None,
) -> torch.Tensor:
    """:func:`labelkit_ext.badge_select` on the pool formed by every rank's shard (rank order);
    the draws use the same seeded uniforms, so the picks (global indices) match one process."""
    info = dist_info or current_dist()
    if not info.enabled:
        return badge_select(probs_shard, embeddings_shard, budget, seed)
    op = "sharded_badge_select"
    device = probs_shard.device
    q, h, g2 = badge_factors(probs_shard, embeddings_shard)
    local = q.shape[0]
    offset, total = _shard_layout(local, [probs_shard, embeddings_shard], op, info)
    if not 0 <= budget <= total:
        raise ValueError(f"{op}: budget={budget} must lie in [0, {total}]")
    uniforms = badge_uniforms(budget, seed)
    factors = torch.cat([q, h, g2[:, None]], 1)
    C = q.shape[1]
    min_d = torch.full((local,), float("inf"), dtype=q.dtype, device=device)
    taken = torch.zeros(local, dtype=torch.bool, device=device)
    picks: list[int] = []
    for t in range(budget):
        if t == 0:
            v, i = _local_best(g2, torch.ones(local, dtype=torch.bool, device=device), offset)
            c = _global_best(v, i, device, info)
        else:
            w = min_d.to(torch.float64).masked_fill(taken, 0.0)
            c = _draw(w, taken, float(uniforms[t]), offset, device, info)
        picks.append(c)
        if offset <= c < offset + local:
            taken[c - offset] = True
        f = _center(factors, c, offset, local)
        qc, hc, g2c = f[:C], f[C:-1], f[-1]
        min_d = torch.minimum(min_d, badge_sq_dist(g2, g2c, q @ qc, h @ hc))
    return torch.tensor(picks, dtype=torch.int64, device=device)
