"""The test battery of ENGINEERING.md for the pool-scoring ops: uncertainty, cosine_topk,
cosine_reduce, kcenter_greedy and badge_select."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FLOAT_DTYPES, TOLERANCES, assert_close, requires_ops
from hypothesis import given, settings
from hypothesis import strategies as st

from labelkit_ext import _ext, badge_select, cosine_reduce, cosine_topk, kcenter_greedy, uncertainty
from labelkit_ext.reference.scoring import (
    badge_select_ref,
    badge_uniforms,
    cosine_reduce_ref,
    cosine_topk_ref,
    kcenter_greedy_ref,
    uncertainty_ref,
)

SINGLE_METHODS = ["entropy", "margin", "least_confidence", "variation_ratio"]
MC_ONLY = ["bald", "mean_std"]


def randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(
        device=device, dtype=dtype
    )


# ---- independent oracles: full matrices and slow NumPy loops in float64 ---------------------------


def cosine_oracle(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The full N x M matrix by F.cosine_similarity (float64): what the streaming ops avoid."""
    return F.cosine_similarity(q.double()[:, None, :], k.double()[None, :, :], dim=-1)


def topk_oracle(q, k, kk, largest=True):
    sims = cosine_oracle(q, k)
    order = torch.sort(sims, dim=1, descending=largest, stable=True).indices[:, :kk]
    return sims.gather(1, order), order


def uncertainty_oracle(scores: np.ndarray, method: str, from_logits: bool) -> np.ndarray:
    """Textbook formulas, one sample at a time."""
    scores = scores.astype(np.float64)

    def probs(z):
        if not from_logits:
            return z
        e = np.exp(z - z.max())
        return e / e.sum()

    def H(p):
        return -sum(pj * math.log(pj) for pj in p if pj > 0)

    if scores.ndim == 2:
        out = []
        for z in scores:
            p = np.sort(probs(z))[::-1]
            second = p[1] if len(p) > 1 else 0.0
            out.append({"entropy": H(p), "margin": 1 - (p[0] - second)}.get(method, 1 - p[0]))
        return np.array(out)
    S, N, _ = scores.shape
    out = []
    for n in range(N):
        ps = np.stack([probs(scores[s, n]) for s in range(S)])
        if method == "bald":
            out.append(H(ps.mean(0)) - np.mean([H(p) for p in ps]))
        elif method == "mean_std":
            out.append(np.sqrt(((ps - ps.mean(0)) ** 2).mean(0)).mean())
        else:
            votes = np.bincount([int(np.argmax(scores[s, n])) for s in range(S)])
            out.append(1 - votes.max() / S)
    return np.array(out)


def kcenter_oracle(x: np.ndarray, budget: int, labeled: list[int], metric: str) -> list[int]:
    """O(budget * N * L): every step recomputes each sample's distance to every center."""
    x = x.astype(np.float64)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    centers = list(labeled)
    picks = []
    if not centers and budget > 0:
        first = int(np.argmin(((x - x.mean(0)) ** 2).sum(1)))
        picks.append(first)
        centers.append(first)
    while len(picks) < budget:
        best, best_i = -1.0, -1
        for i in range(len(x)):
            if i in centers:
                continue
            d = ((x[i] - x[centers]) ** 2).sum(1).min()
            if d > best:
                best, best_i = d, i
        picks.append(best_i)
        centers.append(best_i)
    return picks


def badge_oracle(
    probs: np.ndarray, emb: np.ndarray, budget: int, uniforms: np.ndarray
) -> list[int]:
    """k-means++ (BADGE's seeding) on the explicitly built N x (C*D) gradient embeddings."""
    p = probs.astype(np.float64)
    q = p.copy()
    q[np.arange(len(q)), p.argmax(1)] -= 1.0
    g = (q[:, :, None] * emb.astype(np.float64)[:, None, :]).reshape(len(q), -1)
    picks = [int(np.argmax((g**2).sum(1)))]
    d2 = ((g - g[picks[0]]) ** 2).sum(1)
    for t in range(1, budget):
        w = d2.copy()
        w[picks] = 0.0
        cdf = np.cumsum(w)
        i = int(np.searchsorted(cdf, uniforms[t] * cdf[-1], side="right"))
        picks.append(i)
        d2 = np.minimum(d2, ((g - g[i]) ** 2).sum(1))
    return picks


# ---- 2. references against the oracles ---------------------------------------------------------


@pytest.mark.parametrize("from_logits", [True, False])
def test_uncertainty_reference_matches_oracle(from_logits):
    z = randn(5, 17, 6, scale=3.0, dtype=torch.float64)
    x = z if from_logits else torch.softmax(z, -1)
    for m in SINGLE_METHODS:
        np.testing.assert_allclose(
            uncertainty_ref(x[0], m, from_logits),
            uncertainty_oracle(x[0].numpy(), m, from_logits),
            atol=1e-12,
        )
    for m in MC_ONLY + ["variation_ratio"]:
        np.testing.assert_allclose(
            uncertainty_ref(x, m, from_logits),
            uncertainty_oracle(x.numpy(), m, from_logits),
            atol=1e-12,
        )


@pytest.mark.parametrize("tile", [None, 1, 5, 64])
@pytest.mark.parametrize("largest", [True, False])
def test_cosine_references_match_full_matrix(tile, largest):
    q, k = randn(23, 9, seed=1, dtype=torch.float64), randn(31, 9, seed=2, dtype=torch.float64)
    k[4] = 0.0
    v, i = cosine_topk_ref(q, k, 6, largest, tile_size=tile)
    ov, oi = topk_oracle(q, k, 6, largest)
    torch.testing.assert_close(v, ov)
    assert torch.equal(i, oi)
    sims = cosine_oracle(q, k)
    for reduce, expected in [
        ("max", sims.amax(1)),
        ("min", sims.amin(1)),
        ("mean", sims.mean(1)),
        ("sum", sims.sum(1)),
    ]:
        torch.testing.assert_close(cosine_reduce_ref(q, k, reduce, tile_size=tile), expected)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("labeled", [[], [3, 40, 7]])
def test_kcenter_reference_matches_oracle(metric, labeled):
    x = randn(60, 5, seed=3, dtype=torch.float64)
    x[10] = x[11]  # duplicates
    lab = torch.tensor(labeled, dtype=torch.int64) if labeled else None
    got = kcenter_greedy_ref(x, 12, lab, metric)
    assert got.tolist() == kcenter_oracle(x.numpy(), 12, labeled, metric)


def test_badge_reference_matches_kmeanspp_on_built_embeddings():
    probs = torch.softmax(randn(80, 4, seed=4, scale=2.0, dtype=torch.float64), 1)
    emb = randn(80, 6, seed=5, dtype=torch.float64)
    for seed in range(4):
        u = badge_uniforms(15, seed)
        assert badge_select_ref(probs, emb, 15, u).tolist() == badge_oracle(
            probs.numpy(), emb.numpy(), 15, u.numpy()
        )


# ---- 1. ops against the references and oracles ---------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("shape", [(37, 10), (1, 1), (64, 2), (5, 300)])
def test_uncertainty_matches_reference(device, dtype, from_logits, shape):
    z = randn(*shape, scale=3.0, dtype=torch.float64)
    x = (z if from_logits else torch.softmax(z, -1)).to(device=device, dtype=dtype)
    for m in SINGLE_METHODS:
        out = uncertainty(x, m, from_logits)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(out, uncertainty_ref(x, m, from_logits))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("from_logits", [True, False])
def test_uncertainty_mc_matches_reference(device, dtype, from_logits):
    z = randn(7, 29, 5, scale=2.0, dtype=torch.float64)
    x = (z if from_logits else torch.softmax(z, -1)).to(device=device, dtype=dtype)
    for m in MC_ONLY + ["variation_ratio"]:
        assert_close(uncertainty(x, m, from_logits), uncertainty_ref(x, m, from_logits))


def test_uncertainty_orientation_larger_means_query_first(device):
    confident = torch.tensor([[9.0, 0.0, 0.0]], device=device)
    confused = torch.tensor([[1.0, 1.0, 0.9]], device=device)
    for m in SINGLE_METHODS:
        assert uncertainty(confused, m) > uncertainty(confident, m)
    agree = torch.tensor([[[9.0, 0.0]], [[9.0, 0.0]], [[9.0, 0.0]]], device=device)
    disagree = torch.tensor([[[9.0, 0.0]], [[0.0, 9.0]], [[9.0, 0.0]]], device=device)
    for m in MC_ONLY + ["variation_ratio"]:
        assert uncertainty(disagree, m) > uncertainty(agree, m)


def test_uncertainty_special_values(device):
    inf = math.inf
    x = torch.tensor(
        [[0.0, -inf, 0.0], [math.nan, 0.0, 1.0], [inf, 0.0, 0.0], [-inf, -inf, -inf]], device=device
    )
    for m in SINGLE_METHODS:
        out = uncertainty(x, m)
        ref = uncertainty_ref(x, m)
        assert_close(out, ref)
        assert (
            torch.isfinite(out[0]) and out[1:].isnan().all()
        )  # masked class ok; NaN/+inf/no mass -> NaN
    assert uncertainty(x[:1], "entropy").item() == pytest.approx(math.log(2))


def test_uncertainty_special_values_of_sampled_rows(device):
    """One bad sample row spoils its sample for every MC method: a NaN, a +inf or no class left
    (all -inf) gives NaN; a masked class does not. Kernel and reference agree."""
    inf = math.inf
    good = [[0.0, 1.0, 2.0], [2.0, 0.0, -inf], [1.0, 0.0, 0.0], [0.5, 0.5, 2.0]]
    bad = [[0.0, 1.0, 2.0], [math.nan, 0.0, 0.0], [inf, 0.0, 0.0], [-inf, -inf, -inf]]
    x = torch.tensor([good, bad], device=device).transpose(0, 1).contiguous()  # [S=4, N=2, C=3]
    for m in MC_ONLY + ["variation_ratio"]:
        for rows in ([0, 1, 2, 3], [0, 1], [0, 2], [0, 3]):  # each bad kind alone
            out, ref = uncertainty(x[rows], m), uncertainty_ref(x[rows], m)
            assert_close(out, ref)
            assert torch.isfinite(out[0]) and out[1].isnan(), (m, rows, out)


def test_uncertainty_noncontiguous_and_empty(device):
    x = randn(6, 20, scale=2.0, device=device).t()  # [20, 6], non-contiguous
    for m in SINGLE_METHODS:
        assert_close(uncertainty(x, m), uncertainty_ref(x.contiguous(), m))
    assert uncertainty(torch.empty(0, 4, device=device)).shape == (0,)
    assert uncertainty(torch.empty(3, 0, 4, device=device), "bald").shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uncertainty_grad_matches_reference(device, dtype):
    for shape, methods in [((9, 5), SINGLE_METHODS[:3]), ((4, 9, 5), MC_ONLY)]:
        for from_logits in (True, False):
            z = randn(*shape, scale=2.0, dtype=torch.float64, seed=7)
            base = (z if from_logits else torch.softmax(z, -1)).to(device=device, dtype=dtype)
            for m in methods:
                a = base.clone().requires_grad_()
                b = base.clone().requires_grad_()
                w = randn(shape[-2], device=device, dtype=dtype, seed=8)
                (uncertainty(a, m, from_logits) * w).sum().backward()
                (uncertainty_ref(b, m, from_logits) * w).sum().backward()
                assert_close(a.grad, b.grad)


def test_sampled_variation_ratio_is_not_differentiable(device):
    """A vote count: no graph on either path (the kernel's used to require grad, with zero
    gradients, where the reference's argmax gives a result without one)."""
    mc = randn(4, 6, 3, scale=2.0, device=device).requires_grad_()
    for f in (uncertainty, uncertainty_ref):
        out = f(mc, "variation_ratio")
        assert not out.requires_grad and out.grad_fn is None, f.__name__
    assert uncertainty(mc[0], "variation_ratio").requires_grad  # [N, C]: 1 - max p


def test_uncertainty_gradcheck(device):
    z = randn(6, 4, scale=2.0, dtype=torch.float64, device=device, seed=9)
    zm = randn(3, 5, 4, scale=2.0, dtype=torch.float64, device=device, seed=10)
    for m in SINGLE_METHODS:
        torch.autograd.gradcheck(lambda t, m=m: uncertainty(t, m), (z.clone().requires_grad_(),))
    for m in MC_ONLY:
        torch.autograd.gradcheck(lambda t, m=m: uncertainty(t, m), (zm.clone().requires_grad_(),))
        p = torch.softmax(zm, -1).clone().requires_grad_()
        torch.autograd.gradcheck(lambda t, m=m: uncertainty(t, m, from_logits=False), (p,))


def test_uncertainty_double_backward_is_a_clear_error(device):
    z = randn(6, 4, scale=2.0, dtype=torch.float64, device=device, seed=11).requires_grad_()
    (g,) = torch.autograd.grad(uncertainty(z, "entropy").sum(), z, create_graph=True)
    if not _ext.HAS_OPS:  # the reference is plain autograd: twice differentiable
        torch.autograd.gradgradcheck(lambda t: uncertainty(t, "entropy"), (z,))
        return
    with pytest.raises(RuntimeError, match="double backward.*uncertainty_ref"):
        torch.autograd.grad(g.sum(), z)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("tile", [None, 1, 7, 100, 2**40])  # 2**40: one tile, no N x 2**40 buffer
def test_cosine_topk_matches_reference_and_full_matrix(device, dtype, largest, tile):
    q = randn(45, 12, seed=11, device=device, dtype=dtype)
    k = randn(38, 12, seed=12, device=device, dtype=dtype)
    k[3] = 0.0  # zero vector: similarity 0 with everything
    v, i = cosine_topk(q, k, 7, largest, tile_size=tile)
    rv, _ = cosine_topk_ref(q, k, 7, largest, tile_size=tile)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert v.dtype == acc and i.dtype == torch.int64 and v.shape == i.shape == (45, 7)
    assert_close(v, rv)
    ov, _ = topk_oracle(q, k, 7, largest)
    assert_close(v, ov, dtype=acc)
    # the returned index really holds the returned value, and rows are sorted best first
    sims = cosine_oracle(q, k)
    assert_close(v, sims.gather(1, i), dtype=acc)
    assert ((v[:, :-1] >= v[:, 1:]) if largest else (v[:, :-1] <= v[:, 1:])).all()


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("tile", [None, 2, 3])
def test_cosine_topk_ties_keep_lower_index(device, largest, tile):
    # Keys are scaled basis vectors, so every similarity is exact and equal ones tie bit for bit.
    eye = torch.eye(4, device=device)
    keys = torch.cat([eye * 2, eye, eye * 0.5, torch.zeros(2, 4, device=device)])  # 14 keys
    queries = torch.tensor(
        [[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], device=device
    )
    v, i = cosine_topk(queries, keys, 14, largest, tile_size=tile)
    ov, oi = topk_oracle(queries.cpu(), keys.cpu(), 14, largest)
    assert torch.equal(i.cpu(), oi)
    assert_close(v, ov.to(device), dtype=torch.float32)
    assert i[1].tolist() == list(range(14))  # a zero query ties everything at 0


def test_cosine_eps_semantics_match_cosine_similarity(device):
    q = torch.tensor([[1e-9, 0.0], [3.0, 4.0], [0.0, 0.0]], device=device)
    k = torch.tensor([[1.0, 0.0], [1e-9, 1e-9], [0.0, 0.0]], device=device)
    expected = F.cosine_similarity(q[:, None], k[None], dim=-1)  # per-vector clamp: 1e-9/1e-8 = 0.1
    v, i = cosine_topk(q, k, 3)
    assert_close(v, expected.gather(1, i))
    assert_close(cosine_reduce(q, k, "sum"), expected.sum(1))
    assert v[0, 0].item() == pytest.approx(0.1, rel=1e-5)


def test_cosine_topk_empty_and_noncontiguous(device):
    k = randn(9, 6, seed=13, device=device)
    v, i = cosine_topk(torch.empty(0, 6, device=device), k, 3)
    assert v.shape == i.shape == (0, 3)
    q = randn(6, 11, seed=14, device=device).t()  # [11, 6] non-contiguous
    assert torch.equal(cosine_topk(q, k, 4).indices, cosine_topk(q.contiguous(), k, 4).indices)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduce", ["max", "min", "mean", "sum"])
@pytest.mark.parametrize("tile", [None, 4, 2**40])
def test_cosine_reduce_matches_reference_and_full_matrix(device, dtype, reduce, tile):
    q = randn(33, 10, seed=15, device=device, dtype=dtype)
    k = randn(27, 10, seed=16, device=device, dtype=dtype)
    k[0] = 0.0
    out = cosine_reduce(q, k, reduce, tile_size=tile)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == acc and out.shape == (33,)
    assert_close(out, cosine_reduce_ref(q, k, reduce, tile_size=tile))
    sims = cosine_oracle(q, k)
    expected = {"max": sims.amax(1), "min": sims.amin(1), "mean": sims.mean(1), "sum": sims.sum(1)}[
        reduce
    ]
    assert_close(out, expected.to(device), dtype=acc)
    assert cosine_reduce(torch.empty(0, 10, device=device, dtype=dtype), k, reduce).shape == (0,)


@pytest.mark.parametrize("which", ["queries", "keys", "both"])
def test_cosine_of_inputs_that_require_grad(device, which):
    """Model outputs (requiring grad) give the same answers as detached ones, on kernels and
    fallback alike, and results that do not require grad (documented: not differentiable)."""
    q, k = randn(9, 5, seed=40, device=device), randn(7, 5, seed=41, device=device)
    q_in = q.clone().requires_grad_(which in ("queries", "both"))
    k_in = (k * 1.0).requires_grad_(which in ("keys", "both"))
    top, want = cosine_topk(q_in, k_in, 3), cosine_topk(q, k, 3)
    assert torch.equal(top.values, want.values) and torch.equal(top.indices, want.indices)
    assert not top.values.requires_grad
    for reduce in ("max", "min", "mean", "sum"):
        out = cosine_reduce(q_in, k_in, reduce)
        assert torch.equal(out, cosine_reduce(q, k, reduce)) and not out.requires_grad


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("labeled", [None, [5, 77, 0, 150]])
def test_kcenter_matches_oracle_float64(device, metric, labeled):
    x = randn(160, 7, seed=17, dtype=torch.float64)
    x[20] = x[21] = x[22]  # duplicates
    if metric == "euclidean":
        x[30] = 0.0  # (under cosine a zero row is at distance 1 from every unit row: all ties)
    got = kcenter_greedy(x.to(device), 25, labeled, metric)
    assert got.dtype == torch.int64 and got.device.type == device
    assert got.tolist() == kcenter_oracle(x.numpy(), 25, labeled or [], metric)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_kcenter_matches_reference(device, dtype):
    x = randn(300, 16, seed=18, device=device, dtype=dtype)
    for labeled in (
        None,
        torch.tensor([3, 9], device=device),
        torch.arange(300, device=device) < 10,
        torch.arange(300, device=device) % 7 == 3,  # 43: several groups of seeding centers
    ):
        got = kcenter_greedy(x, 30, labeled)
        lab = (
            None
            if labeled is None
            else (labeled.nonzero().flatten() if labeled.dtype == torch.bool else labeled)
        )
        assert torch.equal(got, kcenter_greedy_ref(x, 30, lab))
        assert not set(got.tolist()) & set([] if lab is None else lab.tolist())
        assert len(set(got.tolist())) == 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kcenter_many_labeled_tiles(device, dtype):
    # The labeled set is seeded in one blocked pass: 100 labeled span several center tiles (CPU:
    # 6 per register tile; CUDA: 64), D = 19 is not a multiple of CUDA's 16-coordinate stages, and
    # 4,500 rows make more 64-row tiles than the emulated GPU's grid has blocks.
    x = randn(4500, 19, seed=31, device=device, dtype=dtype)
    labeled = torch.arange(7, 4500, 45, device=device)
    got = kcenter_greedy(x, 12, labeled)
    assert torch.equal(got, kcenter_greedy_ref(x, 12, labeled))
    cos = kcenter_greedy(x, 12, labeled, "cosine")
    assert torch.equal(cos, kcenter_greedy_ref(x, 12, labeled, "cosine"))


def test_kcenter_duplicates_exhaust_to_lowest_index(device):
    # Two distinct points repeated: after both are centers every distance is 0; the lowest
    # untaken indices follow in order.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], device=device).repeat(4, 1)  # 8 rows
    got = kcenter_greedy(x, 8)
    assert got.tolist() == kcenter_oracle(x.cpu().numpy(), 8, [], "euclidean")
    assert sorted(got.tolist()) == list(range(8))


def test_kcenter_budget_zero_and_full_pool(device):
    x = randn(12, 3, seed=19, device=device)
    assert kcenter_greedy(x, 0).shape == (0,)
    assert sorted(kcenter_greedy(x, 9, [0, 1, 2]).tolist()) == list(range(3, 12))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_badge_matches_reference(device, dtype):
    probs = torch.softmax(randn(200, 5, seed=20, scale=2.0), 1).to(device=device, dtype=dtype)
    emb = randn(200, 8, seed=21, device=device, dtype=dtype)
    for seed in (0, 1):
        got = badge_select(probs, emb, 20, seed=seed)
        assert got.dtype == torch.int64 and len(set(got.tolist())) == 20
        assert torch.equal(got, badge_select_ref(probs, emb, 20, badge_uniforms(20, seed)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [3, 40, 130])
def test_greedy_rows_of_every_lane_group(device, dtype, d):
    # CUDA reads a row with 1, 8 or 32 lanes by its length (3, 40, 130: one of each, and none a
    # multiple of its group); the picks are the reference's.
    x = randn(600, d, seed=40 + d, device=device, dtype=dtype)
    labeled = torch.arange(0, 600, 50, device=device)
    assert torch.equal(kcenter_greedy(x, 15, labeled), kcenter_greedy_ref(x, 15, labeled))
    assert torch.equal(kcenter_greedy(x, 15), kcenter_greedy_ref(x, 15))
    probs = torch.softmax(randn(600, 4, seed=41, scale=2.0), 1).to(device=device, dtype=dtype)
    got = badge_select(probs, x, 15, seed=3)
    assert torch.equal(got, badge_select_ref(probs, x, 15, badge_uniforms(15, 3)))


def test_badge_matches_kmeanspp_oracle_float64(device):
    probs = torch.softmax(randn(120, 3, seed=22, scale=2.0, dtype=torch.float64), 1)
    emb = randn(120, 5, seed=23, dtype=torch.float64)
    emb[7] = emb[8]
    probs[7] = probs[8]
    for seed in range(3):
        got = badge_select(probs.to(device), emb.to(device), 18, seed=seed)
        expected = badge_oracle(probs.numpy(), emb.numpy(), 18, badge_uniforms(18, seed).numpy())
        assert got.tolist() == expected


def test_badge_pool_of_several_draw_blocks_matches_reference(device):
    """N spans three 8192-sample blocks of the CDF sums: the block walk picks what the
    reference's plain cumulative sum picks, and never a sample twice."""
    probs = torch.softmax(randn(20000, 4, seed=24, scale=2.0, dtype=torch.float64), 1)
    emb = randn(20000, 6, seed=25, dtype=torch.float64)
    for seed in (0, 1):
        u = badge_uniforms(25, seed)
        got = badge_select(probs.to(device), emb.to(device), 25, seed=seed)
        assert len(set(got.tolist())) == 25
        assert got.tolist() == badge_select_ref(probs, emb, 25, u).tolist()


@requires_ops
def test_badge_op_reads_strided_uniforms(device):
    """A direct op call with a non-contiguous uniforms tensor reads its values, not its storage."""
    probs = torch.softmax(randn(50, 3, seed=26, scale=2.0), 1).to(device)
    emb = randn(50, 4, seed=27, device=device)
    u = badge_uniforms(16, 3)
    strided = torch.stack([u, torch.zeros_like(u)], 1)[:, 0]
    assert not strided.is_contiguous()
    op = torch.ops.labelkit.badge_select
    assert torch.equal(op(probs, emb, strided[:8], 8), op(probs, emb, u[:8].clone(), 8))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cosine_ignores_tf32_setting():
    """allow_tf32 / 'high' matmul precision must not leak into the similarities (TF32 keeps ~3
    decimal digits): values stay within float32 rounding of the float64 oracle."""
    q = randn(64, 256, seed=28, device="cuda")
    k = randn(300, 256, seed=29, device="cuda")
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        v, i = cosine_topk(q, k, 5)
        m = cosine_reduce(q, k, "max")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    ov, _ = topk_oracle(q.cpu(), k.cpu(), 5)
    torch.testing.assert_close(v.double().cpu(), ov, rtol=0, atol=1e-6)
    torch.testing.assert_close(m.double().cpu(), ov[:, 0], rtol=0, atol=1e-6)


def test_badge_exhausted_mass_takes_lowest_unpicked(device):
    probs = torch.tensor([[0.9, 0.1]], device=device).repeat(5, 1)
    emb = torch.ones(5, 3, device=device)
    assert badge_select(probs, emb, 5).tolist() == [0, 1, 2, 3, 4]


# ---- 7. bad input --------------------------------------------------------------------------------

_Q = torch.randn(4, 3)
_K = torch.randn(5, 3)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: cosine_topk(_Q, _K, 0), ValueError, "k must be >= 1"),
        (lambda: cosine_topk(_Q, _K, 6), ValueError, "larger than the number of keys M=5"),
        (lambda: cosine_topk(_Q, torch.randn(5, 4), 2), ValueError, "same feature size D"),
        (lambda: cosine_topk(_Q, _K.double(), 2), ValueError, "same dtype"),
        (lambda: cosine_topk(_Q[0], _K, 2), ValueError, "queries must be 2-D"),
        (lambda: cosine_topk(_Q, _K.long(), 2), ValueError, "keys must be a floating-point"),
        (lambda: cosine_topk(_Q, _K, 2, eps=0.0), ValueError, "eps must be"),
        (lambda: cosine_topk(_Q, _K, 2, tile_size=0), ValueError, "tile_size must be >= 1"),
        (
            lambda: cosine_topk(torch.full((2, 3), math.nan), _K, 2),
            ValueError,
            "queries must be finite",
        ),
        (
            lambda: cosine_topk(_Q, torch.empty(0, 3), 1),
            ValueError,
            "larger than the number of keys M=0",
        ),
        (lambda: cosine_reduce(_Q, _K, "median"), ValueError, "reduce must be one of"),
        (lambda: cosine_reduce(_Q, torch.empty(0, 3)), ValueError, "keys is empty"),
        (lambda: cosine_reduce(_Q, _K.clone().fill_(math.inf)), ValueError, "keys must be finite"),
        (
            lambda: cosine_reduce(torch.empty(2, 0), torch.empty(3, 0)),
            ValueError,
            "empty feature dimension",
        ),
        (lambda: uncertainty(_Q, "bald"), ValueError, r"3-D Monte-Carlo samples \[S, N, C\]"),
        (lambda: uncertainty(_Q[None], "entropy"), ValueError, r"2-D \[N, C\]"),
        (lambda: uncertainty(_Q, "variance"), ValueError, "method must be one of"),
        (lambda: uncertainty(torch.empty(3, 0)), ValueError, "empty class dimension"),
        (lambda: uncertainty(torch.empty(0, 3, 2), "bald"), ValueError, "no Monte-Carlo samples"),
        (lambda: uncertainty(_Q, from_logits=False), ValueError, r"probabilities in \[0, 1\]"),
        (lambda: uncertainty(_Q.long()), ValueError, "floating-point"),
        (lambda: kcenter_greedy(_K, 6), ValueError, "larger than the unlabeled pool"),
        (
            lambda: kcenter_greedy(_K, 3, [0, 1, 2]),
            ValueError,
            r"budget=3 is larger than the unlabeled pool \(2",
        ),
        (
            lambda: kcenter_greedy(_K, 1, [5]),
            ValueError,
            r"labeled indices must lie in \[0, N = 5\)",
        ),
        (lambda: kcenter_greedy(_K, 1, [-1]), ValueError, "labeled indices must lie"),
        (lambda: kcenter_greedy(_K, 1, [1, 1]), ValueError, "labeled indices must not repeat"),
        (
            lambda: kcenter_greedy(_K, 1, torch.ones(4, dtype=torch.bool)),
            ValueError,
            "bool labeled mask",
        ),
        (lambda: kcenter_greedy(_K, 1, "0"), TypeError, "labeled must be"),
        (lambda: kcenter_greedy(_K, -1), ValueError, "budget must be >= 0"),
        (lambda: kcenter_greedy(_K, 1, metric="l1"), ValueError, "metric must be one of"),
        (
            lambda: kcenter_greedy(_K.clone().fill_(math.nan), 1),
            ValueError,
            "embeddings must be finite",
        ),
        (lambda: badge_select(torch.rand(5, 2), _K[:4], 1), ValueError, "same number of samples N"),
        (
            lambda: badge_select(torch.rand(5, 2), _K, 6),
            ValueError,
            "larger than the unlabeled pool",
        ),
        (lambda: badge_select(torch.rand(5, 2), _K, 1, seed=-1), ValueError, "seed must be >= 0"),
        (
            lambda: badge_select(torch.full((5, 2), math.nan), _K, 1),
            ValueError,
            r"probs must be probabilities in \[0, 1\]",
        ),
        (  # logits passed for probabilities
            lambda: badge_select(torch.tensor([[2.0, -1.0]] * 5), _K, 1),
            ValueError,
            r"probs must be probabilities in \[0, 1\]",
        ),
        (
            lambda: badge_select(torch.rand(5, 2, dtype=torch.float64), _K, 1),
            ValueError,
            "probs and embeddings must have the same dtype",
        ),
        (lambda: badge_select(torch.rand(5, 2), _K, 1, seed=2**70), ValueError, "seed must be < 2"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@requires_ops
def test_kernels_check_arguments_directly():
    ops = torch.ops.labelkit
    with pytest.raises(RuntimeError, match="labeled indices must lie"):
        ops.kcenter_greedy(_K, 1, torch.tensor([9]), False, 1e-8)
    with pytest.raises(RuntimeError, match="labeled indices must not repeat"):
        ops.kcenter_greedy(_K, 1, torch.tensor([1, 1]), False, 1e-8)
    with pytest.raises(RuntimeError, match="larger than the number of keys"):
        ops.cosine_topk(_Q, _K, 9, True, 1e-8, 0)
    with pytest.raises(RuntimeError, match="wrong rank"):
        ops.uncertainty(_Q, "bald", True)
    with pytest.raises(RuntimeError, match="uniforms must be"):
        ops.badge_select(torch.rand(5, 2), _K, torch.rand(2), 3)
    with pytest.raises(RuntimeError, match=r"grad must have shape \[N\] = \[4\]"):
        ops._uncertainty_backward(torch.ones(3), _Q, "entropy", True)


@requires_ops
def test_kernels_refuse_mixed_devices(device):
    """Direct op calls with a tensor on another device (meta beside CPU dispatches to the fake
    kernel, CPU beside CUDA to the CUDA one) raise instead of reading another device's memory."""
    ops = torch.ops.labelkit
    other = "cpu" if device == "cuda" else "meta"
    q, k = _Q.to(device), _K.to(device)
    with pytest.raises(RuntimeError, match="grad must be on the scores' device"):
        ops._uncertainty_backward(torch.ones(4, device=other), q, "entropy", True)
    with pytest.raises(RuntimeError, match="queries and keys must be on the same device"):
        ops.cosine_topk(q, k.to(other), 2, True, 1e-8, 0)
    with pytest.raises(RuntimeError, match="queries and keys must be on the same device"):
        ops.cosine_reduce(q, k.to(other), "max", 1e-8, 0)
    probs = torch.softmax(k, 1)
    with pytest.raises(RuntimeError, match="probs and embeddings must be on the same device"):
        ops.badge_select(probs, k.to(other), badge_uniforms(2, 0), 2)


# ---- 4. opcheck, 5. torch.compile, 6. autocast -----------------------------------------------------


@requires_ops
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    z = randn(6, 5, device=device, scale=2.0).requires_grad_(requires_grad)
    zm = randn(3, 6, 5, device=device, scale=2.0).requires_grad_(requires_grad)
    ops = torch.ops.labelkit
    for m in SINGLE_METHODS:
        torch.library.opcheck(ops.uncertainty.default, (z, m, True))
    for m in MC_ONLY + ["variation_ratio"]:
        torch.library.opcheck(ops.uncertainty.default, (zm, m, True))
    q, k = randn(7, 4, device=device), randn(9, 4, device=device, seed=1)
    torch.library.opcheck(
        ops.cosine_topk.default,
        (q, k, 3, True, 1e-8, 0),
    )
    torch.library.opcheck(
        ops.cosine_reduce.default,
        (q, k, "max", 1e-8, 2),
    )
    torch.library.opcheck(
        ops.kcenter_greedy.default,
        (k, 3, None, False, 1e-8),
        test_utils=("test_schema", "test_faketensor"),
    )
    probs = torch.softmax(k, 1)
    torch.library.opcheck(
        ops.badge_select.default,
        (probs, k, badge_uniforms(3, 0), 3),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(ops._badge_uniforms.default, (3, -5))
    assert torch.equal(ops._badge_uniforms(3, -5), badge_uniforms(3, 2**64 - 5))


@requires_ops
@pytest.mark.parametrize("dynamic", [False, True])  # True: eps becomes a symbolic float
def test_compile_fullgraph_matches_eager(dynamic):
    torch._dynamo.reset()
    z = randn(20, 6, scale=2.0)
    q, k = randn(15, 8), randn(25, 8, seed=1)

    def fn(z, q, k):
        u = uncertainty(z, "margin")
        top = cosine_topk(q, k, 4)
        centers = kcenter_greedy(k, 3, labeled=torch.tensor([4, 0]))
        picks = badge_select(torch.softmax(k[:, :5], 1), k, 4, seed=2**64 - 3)
        return u, top.values, top.indices, cosine_reduce(q, k, "mean"), centers, picks

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    for a, b in zip(compiled(z, q, k), fn(z, q, k), strict=True):
        torch.testing.assert_close(a, b)
    if dynamic:  # another eps and other sizes through the same graph
        eps = 1e-3
        k = randn(31, 8, seed=3)
        got = torch.compile(lambda q, k, eps: cosine_reduce(q, k, "max", eps=eps), fullgraph=True,
                            dynamic=True)(q, k, eps)  # fmt: skip
        torch.testing.assert_close(got, cosine_reduce(q, k, "max", eps=eps))


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_output_dtype(device, amp_dtype):
    z = randn(8, 5, device=device)
    q, k = randn(6, 4, device=device), randn(7, 4, device=device, seed=1)
    with torch.autocast(device_type=device, dtype=amp_dtype):
        assert uncertainty(z).dtype == torch.float32
        assert uncertainty(z.to(amp_dtype), "margin").dtype == torch.float32
        assert cosine_topk(q.to(amp_dtype), k.to(amp_dtype), 2).values.dtype == torch.float32


# ---- 8. routing ----------------------------------------------------------------------------------


def test_fallback_routing_matches_build():
    for op in ("uncertainty", "cosine_topk", "cosine_reduce", "kcenter_greedy", "badge_select"):
        assert _ext.has_kernel(op, "cpu") == _ext.HAS_OPS


# ---- 9. property tests ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 20),
    m=st.integers(1, 30),
    d=st.integers(1, 6),
    data=st.data(),
)
def test_cosine_topk_property(n, m, d, data):
    k = data.draw(st.integers(1, m))
    tile = data.draw(st.one_of(st.none(), st.integers(1, 40)))
    largest = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**16))
    # small integer coordinates: many exact ties, duplicates and zero vectors
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (n, d), generator=g).double()
    keys = torch.randint(-2, 3, (m, d), generator=g).double()
    v, i = cosine_topk(q, keys, k, largest, tile_size=tile)
    rv, ri = cosine_topk_ref(q, keys, k, largest, tile_size=tile)
    ov, _ = topk_oracle(q, keys, k, largest)
    tol = TOLERANCES[torch.float64]
    torch.testing.assert_close(v, ov, **tol)
    torch.testing.assert_close(rv, ov, **tol)
    sims = cosine_oracle(q, keys)
    torch.testing.assert_close(sims.gather(1, i), v, **tol)
    # among (numerically) equal values the lower key index comes first
    same = v[:, 1:] == v[:, :-1]  # ties are equal computed values
    assert (i[:, 1:] > i[:, :-1])[same].all()
    assert (ri[:, 1:] > ri[:, :-1])[same].all()
    for reduce in ("max", "min", "mean"):
        expected = getattr(sims, {"max": "amax", "min": "amin", "mean": "mean"}[reduce])(1)
        torch.testing.assert_close(cosine_reduce(q, keys, reduce, tile_size=tile), expected, **tol)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 150), d=st.integers(1, 4), data=st.data())
def test_kcenter_property(n, d, data):
    # n spans several of the CPU kernel's 64-row seeding tiles, n_lab several 6-center groups
    n_lab = data.draw(st.integers(0, min(20, n - 1)))
    budget = data.draw(st.integers(0, min(n - n_lab, 40)))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, d), generator=g).double()  # many duplicates and exact ties
    labeled = torch.randperm(n, generator=g)[:n_lab].tolist()
    metric = data.draw(st.sampled_from(["euclidean", "cosine"]))
    got = kcenter_greedy(x, budget, labeled, metric).tolist()
    if metric == "euclidean":  # integer points: every distance is exact, ties included
        assert got == kcenter_oracle(x.numpy(), budget, labeled, metric)
    else:  # normalising rounds: points tied exactly can differ by an ulp in either order
        assert_greedy_farthest(x.numpy(), got, labeled, budget)


def assert_greedy_farthest(x: np.ndarray, picks: list[int], labeled: list[int], budget: int):
    """Each pick is a farthest (cosine-normalised) point from the centers so far, up to
    rounding, and never a center; the first pick without labels is the oracle's."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    assert len(picks) == budget and len(set(picks) | set(labeled)) == budget + len(labeled)
    centers = list(labeled)
    for step, pick in enumerate(picks):
        if not centers:
            assert pick == kcenter_oracle(x, 1, [], "euclidean")[0]
        else:
            d = np.array([min(((x[i] - x[c]) ** 2).sum() for c in centers) for i in range(len(x))])
            d[centers] = -1.0
            assert d[pick] >= d.max() - 1e-12 * max(1.0, d.max()), (step, pick, d[pick], d.max())
        centers.append(pick)


# ---- the benchmark script on tiny sizes (keeps it from rotting) -----------------------------------


def test_bench_scoring_smoke(tmp_path):
    import importlib
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    try:
        bench = importlib.import_module("bench.bench_scoring")
    finally:
        sys.path.remove(str(root))
    argv = [
        "--topk-n",
        "300",
        "--topk-m",
        "200",
        "--topk-d",
        "16",
        "--kcenter-n",
        "400",
        "--kcenter-d",
        "8",
    ]
    argv += [
        "--kcenter-budget",
        "10",
        "--mc",
        "3,100,5",
        "--runs",
        "1",
        "--no-memory",
        "--device",
        "cpu",
    ]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    (csv_path,) = tmp_path.glob("*/scoring.csv")
    text = csv_path.read_text()
    for case in ("topk", "reduce_mean", "kcenter", "uncertainty_bald"):
        assert case in text
