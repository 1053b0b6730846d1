"""Reference implementations of the pool-scoring op family in plain PyTorch.

They are the fallback when no kernel exists, the test oracle and the benchmark baseline. All of
them stream over tiles, so none builds the full N x M similarity matrix or the N x (C*D) BADGE
gradient embedding either. They assume validated arguments (the public wrappers check).

Conventions shared with the kernels (docs/ops/scoring.md):
- computation in float32 for float16/bfloat16/float32 inputs, float64 for float64;
- cosine similarity is ``<x / max(|x|, eps), y / max(|y|, eps)>``, the per-vector clamp of
  ``torch.nn.functional.cosine_similarity``: a zero vector has similarity 0 with everything;
- ties in a top-k keep the lower key index first; a greedy argmax takes the lowest index.
"""

from __future__ import annotations

import torch

from labelkit_ext.ops.types import TopK
from labelkit_ext.reference.entropy import accumulation_dtype, softmax_entropy_ref

#: Rows/columns per tile of the references (the kernels choose their own).
DEFAULT_TILE = 1024

UNCERTAINTY_METHODS = (
    "entropy",
    "margin",
    "least_confidence",
    "variation_ratio",
    "bald",
    "mean_std",
)
MC_METHODS = ("bald", "mean_std")


# ---- uncertainty --------------------------------------------------------------------------------


def _probabilities(scores: torch.Tensor, from_logits: bool) -> torch.Tensor:
    x = scores.to(accumulation_dtype(scores.dtype))
    return torch.softmax(x, dim=-1) if from_logits else x


def _entropy(scores: torch.Tensor, from_logits: bool) -> torch.Tensor:
    if from_logits:
        return softmax_entropy_ref(scores, dim=-1)
    p = _probabilities(scores, False)
    return -torch.special.xlogy(p, p).sum(-1)


def _entropy_of_mean(p_mean: torch.Tensor, from_logits: bool) -> torch.Tensor:
    """H of the mean predictive distribution. From logits, a mean probability is 0 only where
    every sample's exp underflowed; there the derivative of the whole is 0 (as the kernels
    give), but xlogy's backward would multiply that 0 by log 0 and give NaN."""
    if not from_logits:
        return _entropy(p_mean, False)
    safe = torch.where(p_mean > 0, p_mean, torch.ones_like(p_mean))
    return -(p_mean * safe.log()).sum(-1)


def _population_std(p: torch.Tensor) -> torch.Tensor:
    """std over the samples (dim 0). Where the samples agree, or their spread underflows,
    std's derivative 1 / (2 std) is infinite: the gradient there is 0, as the kernels give
    (``Tensor.std``'s backward divides by the underflowed std and gives NaN)."""
    var = (p - p.mean(0)).square().mean(0)
    root = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
    return torch.where(var == 0, torch.zeros_like(var), root)  # NaN stays NaN


def _top2(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest and second-largest probability per row (second is 0 with one class)."""
    if p.shape[-1] == 1:
        return p[..., 0], torch.zeros_like(p[..., 0])
    top = p.topk(2, dim=-1).values
    return top[..., 0], top[..., 1]


def _mc_variation_ratio(scores: torch.Tensor, from_logits: bool) -> torch.Tensor:
    """1 - (votes of the modal class) / S over the S sampled argmax predictions; NaN for a
    sample with a NaN (or, for logits, +inf or an all ``-inf`` row) score, as the other MC
    methods."""
    S, N, C = scores.shape
    dtype = accumulation_dtype(scores.dtype)
    votes = torch.zeros(N, C, dtype=dtype, device=scores.device)
    votes.scatter_add_(
        1, scores.argmax(-1).t(), torch.ones(N, S, dtype=dtype, device=scores.device)
    )
    if from_logits:
        bad = (scores.isnan() | (scores == float("inf"))).any(-1)
        bad |= (scores == float("-inf")).all(-1)  # no class left: softmax is undefined
    else:
        bad = scores.isnan().any(-1)
    return (1.0 - votes.amax(-1) / S).masked_fill(bad.any(0), float("nan"))


def uncertainty_ref(
    scores: torch.Tensor, method: str = "entropy", from_logits: bool = True
) -> torch.Tensor:
    """Per-sample uncertainty, larger = query first; see :func:`labelkit_ext.uncertainty`."""
    if method == "entropy":
        return _entropy(scores, from_logits)
    if method == "variation_ratio" and scores.dim() == 3:
        return _mc_variation_ratio(scores, from_logits)
    if method in ("least_confidence", "variation_ratio"):
        return 1.0 - _probabilities(scores, from_logits).amax(-1)
    if method == "margin":
        first, second = _top2(_probabilities(scores, from_logits))
        return 1.0 - (first - second)
    p = _probabilities(scores, from_logits)  # [S, N, C]
    if method == "bald":
        return _entropy_of_mean(p.mean(0), from_logits) - _entropy(scores, from_logits).mean(0)
    if method == "mean_std":
        return _population_std(p).mean(-1)
    raise ValueError(f"uncertainty: unknown method {method!r}")


# ---- cosine similarity --------------------------------------------------------------------------


def normalize_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / max(|x|, eps)`` per row, in the accumulation dtype (cosine_similarity's rule)."""
    x = x.to(accumulation_dtype(x.dtype))
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def _tile(tile_size: int | None) -> int:
    return tile_size or DEFAULT_TILE


def cosine_topk_ref(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    largest: bool = True,
    eps: float = 1e-8,
    tile_size: int | None = None,
) -> TopK:
    """Top-k cosine similarities of every query over the keys, tile by tile.

    Each key tile's scores are merged with the running top-k by a *stable* sort of
    ``[running, tile]``: the running entries hold lower key indices, so ties keep the lower index.
    """
    q_hat = normalize_rows(queries, eps)
    k_hat = normalize_rows(keys, eps)
    N, M = q_hat.shape[0], k_hat.shape[0]
    tile = _tile(tile_size)
    values = q_hat.new_empty(N, k)
    indices = torch.empty(N, k, dtype=torch.int64, device=q_hat.device)
    for n0 in range(0, N, tile):
        q = q_hat[n0 : n0 + tile]
        best_v = q.new_empty(q.shape[0], 0)
        best_i = indices.new_empty(q.shape[0], 0)
        for m0 in range(0, M, tile):
            scores = q @ k_hat[m0 : m0 + tile].t()
            ids = torch.arange(m0, m0 + scores.shape[1], device=q.device).expand_as(scores)
            cand_v = torch.cat([best_v, scores], 1)
            cand_i = torch.cat([best_i, ids], 1)
            order = torch.sort(cand_v, dim=1, descending=largest, stable=True).indices[:, :k]
            best_v, best_i = cand_v.gather(1, order), cand_i.gather(1, order)
        values[n0 : n0 + tile] = best_v
        indices[n0 : n0 + tile] = best_i
    return TopK(values, indices)


def cosine_reduce_ref(
    queries: torch.Tensor,
    keys: torch.Tensor,
    reduce: str = "max",
    eps: float = 1e-8,
    tile_size: int | None = None,
) -> torch.Tensor:
    """max / min / mean / sum over the keys of each query's cosine similarity, tile by tile."""
    q_hat = normalize_rows(queries, eps)
    k_hat = normalize_rows(keys, eps)
    M = k_hat.shape[0]
    tile = _tile(tile_size)
    out = []
    for n0 in range(0, q_hat.shape[0], tile):
        q = q_hat[n0 : n0 + tile]
        acc = None
        for m0 in range(0, M, tile):
            scores = q @ k_hat[m0 : m0 + tile].t()
            if reduce == "max":
                part = scores.amax(1)
                acc = part if acc is None else torch.maximum(acc, part)
            elif reduce == "min":
                part = scores.amin(1)
                acc = part if acc is None else torch.minimum(acc, part)
            else:
                part = scores.sum(1)
                acc = part if acc is None else acc + part
        out.append(acc / M if reduce == "mean" else acc)
    if not out:
        return q_hat.new_empty(0)
    return torch.cat(out)


# ---- greedy selections --------------------------------------------------------------------------


def _sq_dist_to(x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """|x_i - center|^2 for every row, from the differences (no |x|^2 - 2xc + |c|^2 cancellation)."""
    return (x - center).square().sum(-1)


def kcenter_greedy_ref(
    embeddings: torch.Tensor,
    budget: int,
    labeled: torch.Tensor | None = None,
    metric: str = "euclidean",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Core-set greedy (Sener & Savarese 2018) with a running minimum distance.

    ``labeled`` is a validated int64 index tensor (possibly empty) or None. Without labeled
    points the first pick is the point nearest the mean. Cosine distance ranks like
    ``|x_hat - c_hat|^2 = 2 - 2 cos``, which is what is computed.
    """
    x = (
        normalize_rows(embeddings, eps)
        if metric == "cosine"
        else embeddings.to(accumulation_dtype(embeddings.dtype))
    )
    N = x.shape[0]
    picks = torch.empty(budget, dtype=torch.int64, device=x.device)
    if budget == 0:
        return picks
    min_d = torch.full((N,), float("inf"), dtype=x.dtype, device=x.device)
    taken = torch.zeros(N, dtype=torch.bool, device=x.device)
    start = 0
    if labeled is not None and labeled.numel() > 0:
        for i in labeled.tolist():
            min_d = torch.minimum(min_d, _sq_dist_to(x, x[i]))
        taken[labeled] = True
    else:
        first = int(_sq_dist_to(x, x.mean(0)).argmin())
        picks[0] = first
        taken[first] = True
        min_d = _sq_dist_to(x, x[first])
        start = 1
    for t in range(start, budget):
        masked = min_d.masked_fill(taken, -1.0)
        c = int(masked.argmax())  # first index of the maximum
        picks[t] = c
        taken[c] = True
        min_d = torch.minimum(min_d, _sq_dist_to(x, x[c]))
    return picks


#: Squared BADGE distances below this many ulp of |g_i|^2 + |g_c|^2 are cancellation noise: 0.
BADGE_CANCEL_ULP = 16.0


def badge_sq_dist(
    g2_i: torch.Tensor, g2_c: torch.Tensor, qq: torch.Tensor, hh: torch.Tensor
) -> torch.Tensor:
    """|g_i - g_c|^2 = |g_i|^2 + |g_c|^2 - 2 <q_i, q_c><h_i, h_c>; values within the formula's
    rounding error of 0 (a few ulp of |g_i|^2 + |g_c|^2) are exactly 0, as for duplicates."""
    d = g2_i + g2_c - 2.0 * qq * hh
    floor = BADGE_CANCEL_ULP * torch.finfo(d.dtype).eps * (g2_i + g2_c)
    return torch.where(d > floor, d, torch.zeros_like(d))


def badge_uniforms(budget: int, seed: int) -> torch.Tensor:
    """The float64 uniforms of the k-means++ draws: one per pick (the first pick is
    deterministic and ignores its own). Drawn on the CPU so every device and shard agrees."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(budget, generator=g, dtype=torch.float64)


def badge_factors(probs: torch.Tensor, embeddings: torch.Tensor):
    """(q, h, |g|^2) with q = p - onehot(argmax p): g_i = q_i (x) h_i is BADGE's gradient
    embedding of the last layer, so |g_i|^2 = |q_i|^2 |h_i|^2 and <g_i, g_j> = <q_i, q_j><h_i, h_j>."""
    acc = accumulation_dtype(embeddings.dtype)
    q = probs.to(acc).clone()
    q[torch.arange(q.shape[0], device=q.device), q.argmax(1)] -= 1.0
    h = embeddings.to(acc)
    return q, h, q.square().sum(1) * h.square().sum(1)


def badge_sample(weights: torch.Tensor, u: float, taken: torch.Tensor) -> int:
    """Index drawn with probability proportional to ``weights`` (float64, >= 0) by inverse CDF:
    the first i with cumsum[i] > u * total. With no mass left, the lowest untaken index."""
    total = float(weights.sum())
    if not total > 0.0:
        return int((~taken).nonzero()[0])
    cdf = weights.cumsum(0)
    i = int(
        torch.searchsorted(
            cdf, torch.tensor([u * total], dtype=cdf.dtype, device=cdf.device), right=True
        )
    )
    if i >= weights.shape[0]:  # u * total rounded onto the last step of the CDF
        i = int(weights.nonzero()[-1])
    return i


def badge_select_ref(
    probs: torch.Tensor, embeddings: torch.Tensor, budget: int, uniforms: torch.Tensor
) -> torch.Tensor:
    """BADGE (Ash et al. 2020): k-means++ seeding on the gradient embeddings, never built.

    The first pick is the largest |g| (lowest index on ties); pick t samples i with probability
    proportional to the squared distance to the nearest pick, using ``uniforms[t]``.
    """
    if budget == 0:  # (also when there are no classes or features to form g from)
        return torch.empty(0, dtype=torch.int64, device=probs.device)
    q, h, g2 = badge_factors(probs, embeddings)
    N = q.shape[0]
    picks = torch.empty(budget, dtype=torch.int64, device=q.device)
    taken = torch.zeros(N, dtype=torch.bool, device=q.device)
    min_d = torch.full((N,), float("inf"), dtype=q.dtype, device=q.device)
    for t in range(budget):
        if t == 0:
            c = int(g2.argmax())
        else:
            w = min_d.to(torch.float64).masked_fill(taken, 0.0)
            c = badge_sample(w, float(uniforms[t]), taken)
        picks[t] = c
        taken[c] = True
        min_d = torch.minimum(min_d, badge_sq_dist(g2, g2[c], q @ q[c], h @ h[c]))
    return picks
