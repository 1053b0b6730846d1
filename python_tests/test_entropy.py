"""The test battery of ENGINEERING.md for softmax_entropy, entropy_gate and max_entropy_loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import FLOAT_DTYPES, assert_close, requires_ops
from hypothesis import given, settings
from hypothesis import strategies as st

import labelkit_ext
from labelkit_ext import EntropyGate, _ext, entropy_gate, max_entropy_loss, softmax_entropy
from labelkit_ext.ops.entropy import MAX_ENTROPY_EPS
from labelkit_ext.reference.entropy import cluster_mass_ref, entropy_gate_ref, softmax_entropy_ref

INF = math.inf


# ---- independent oracles: slow, obvious NumPy loops in float64 ---------------------------------


def entropy_oracle(rows: np.ndarray) -> np.ndarray:
    """Entropy per row by the textbook formula, with the documented special-value policy."""
    out = np.empty(rows.shape[0])
    for i, z in enumerate(rows.astype(np.float64)):
        if np.isnan(z).any() or np.isposinf(z).any() or np.isneginf(z).all():
            out[i] = np.nan
            continue
        live = z[~np.isneginf(z)]
        p = np.exp(live - live.max())
        p /= p.sum()
        out[i] = -sum(pj * math.log(pj) for pj in p if pj > 0)
    return out


def gate_oracle(rows: np.ndarray, threshold: float, clusters: np.ndarray, S: int):
    H = entropy_oracle(rows)
    pred = np.array([int(np.argmax(z)) for z in rows])
    mass = np.zeros((rows.shape[0], S))
    for i, z in enumerate(rows.astype(np.float64)):
        p = np.exp(z - z.max())
        p /= p.sum()
        for j, c in enumerate(clusters):
            mass[i, c] += p[j]
    return H, H >= threshold, pred, mass, mass.argmax(axis=1)


def make_logits(shape, dtype=torch.float32, device="cpu", scale=3.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(
        device=device, dtype=dtype
    )


def ref64(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The reference evaluated in float64 on exactly the same values."""
    return softmax_entropy_ref(logits.double(), dim=dim)


# ---- 2. the reference against the oracle ---------------------------------------------------------


def test_reference_matches_numpy_oracle():
    x = make_logits((6, 9), torch.float64)
    x[1, 3] = -INF  # masked class
    x[2, :] = 0.0  # uniform
    x[3, 0] = 1e4  # one-hot in effect
    x[4, :] = -INF  # all masked -> NaN
    x[5, 2] = math.nan
    torch.testing.assert_close(
        softmax_entropy_ref(x), torch.from_numpy(entropy_oracle(x.numpy())), equal_nan=True
    )


def test_gate_reference_matches_numpy_oracle():
    x = make_logits((8, 7), torch.float64)
    clusters = torch.tensor([0, 2, 1, 0, 2, 2, 1])
    thr = 1.2
    ref = entropy_gate_ref(x, thr, clusters, 3)
    H, unc, pred, mass, cl = gate_oracle(x.numpy(), thr, clusters.numpy(), 3)
    torch.testing.assert_close(ref.entropy, torch.from_numpy(H))
    assert ref.uncertain.tolist() == unc.tolist()
    assert ref.prediction.tolist() == pred.tolist()
    torch.testing.assert_close(ref.cluster_probs, torch.from_numpy(mass))
    assert ref.cluster.tolist() == cl.tolist()


# ---- 1. forward against the reference -------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 11), (1, 1), (5,), (33, 100), (2, 1000)])
def test_softmax_entropy_forward(device, dtype, shape):
    x = make_logits(shape, dtype, device)
    out = softmax_entropy(x)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == shape[:-1]
    assert_close(out, ref64(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [10, 32, 33, 64, 65, 100, 128, 129])
def test_block_sizes_and_batch_independence(device, dtype, C):
    """Row counts and widths around the CPU kernels' row blocks (32/64 rows, C <= 32 / 64 / 128
    paths): every output of entropy_gate matches the reference, ties and NaN rows included, and
    a row's results do not depend on the rows batched with it."""
    x = make_logits((97, C), torch.float32, device).to(dtype)
    x[3, :] = 1.0  # a tie everywhere: prediction 0
    x[40, C // 2] = math.nan
    x[41, -1] = math.nan
    x[70, :] = -INF
    clusters = torch.arange(C, device=device) % 4
    out = entropy_gate(x, 1.5, clusters, num_clusters=4)
    ref = entropy_gate_ref(x.double(), 1.5, clusters, 4)
    assert_close(out.entropy, ref.entropy.float())
    assert_close(out.cluster_probs, ref.cluster_probs.float())
    live = ~ref.entropy.isnan()
    assert torch.equal(out.uncertain[live], ref.uncertain[live])
    assert out.prediction.tolist() == ref.prediction.tolist()
    assert out.prediction[40] == C // 2 and out.prediction[41] == C - 1 and out.prediction[3] == 0
    for i in (0, 31, 63, 64, 96):
        alone = entropy_gate(x[i : i + 1], 1.5, clusters, num_clusters=4)
        assert torch.equal(alone.entropy, out.entropy[i : i + 1])
        assert torch.equal(alone.cluster_probs, out.cluster_probs[i : i + 1])
        assert torch.equal(softmax_entropy(x[i : i + 1]), softmax_entropy(x)[i : i + 1])


@pytest.mark.parametrize("dim", [0, 1, -3])
def test_softmax_entropy_dim_and_noncontiguous(device, dim):
    x = make_logits((6, 7, 8), torch.float32, device)
    assert_close(softmax_entropy(x, dim=dim), ref64(x, dim=dim))
    xt = x.transpose(0, 2)  # non-contiguous
    assert not xt.is_contiguous()
    assert_close(softmax_entropy(xt), ref64(xt))
    xs = x[:, ::2, 1:]  # strided slice
    assert_close(softmax_entropy(xs, dim=dim), ref64(xs, dim=dim))


def test_softmax_entropy_empty_rows(device):
    x = torch.empty(0, 5, device=device)
    out = softmax_entropy(x)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize("base", [2, 10, math.e])
def test_softmax_entropy_base(device, base):
    x = make_logits((4, 6), torch.float32, device)
    assert_close(softmax_entropy(x, base=base), ref64(x) / math.log(base))


def test_softmax_entropy_known_values(device):
    C = 37
    uniform = torch.zeros(3, C, device=device)
    assert_close(softmax_entropy(uniform), torch.full((3,), math.log(C)))
    assert_close(softmax_entropy(uniform, base=2), torch.full((3,), math.log2(C)))
    one_class = torch.randn(4, 1, device=device)
    assert torch.equal(softmax_entropy(one_class), torch.zeros(4, device=device))


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_softmax_entropy_extreme_logits(device, scale):
    x = make_logits((16, 50), torch.float32, device, scale=1.0)
    x[:, 0] += scale
    out = softmax_entropy(x)
    assert torch.isfinite(out).all()
    assert_close(out, ref64(x))


def test_softmax_entropy_large_class_count(device):
    x = make_logits((3, 100_000), torch.float32, device, scale=0.5)
    assert_close(softmax_entropy(x), ref64(x))


def test_softmax_entropy_masked_classes(device):
    x = make_logits((5, 12), torch.float32, device)
    x[:, ::3] = -INF
    out = softmax_entropy(x)
    assert_close(out, ref64(x[:, x[0] != -INF]))  # masking == dropping those classes
    assert torch.isfinite(out).all()


def test_softmax_entropy_special_value_policy(device):
    x = make_logits((5, 8), torch.float32, device)
    x[1, :] = -INF  # all masked
    x[2, 4] = math.nan
    x[3, 1] = INF
    out = softmax_entropy(x)
    assert torch.isnan(out[1:4]).all()
    assert torch.isfinite(out[[0, 4]]).all()
    assert_close(out[[0, 4]], ref64(x[[0, 4]]))


# ---- 3. gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_softmax_entropy_grad_matches_reference(device, dtype):
    x = make_logits((9, 31), dtype, device).requires_grad_()
    w = torch.rand(9, device=device)
    (softmax_entropy(x) * w).sum().backward()
    x_ref = x.detach().double().requires_grad_()
    (softmax_entropy_ref(x_ref) * w.double()).sum().backward()
    assert x.grad.dtype == dtype
    assert_close(x.grad, x_ref.grad)


def test_softmax_entropy_grad_masked_and_dim(device):
    x = make_logits((4, 6, 5), torch.float32, device)
    x[:, 2, :] = -INF
    x.requires_grad_()
    softmax_entropy(x, dim=1).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[:, 2, :] == 0).all()
    x_ref = x.detach().double().requires_grad_()
    softmax_entropy_ref(x_ref, dim=1).sum().backward()
    assert_close(x.grad, x_ref.grad)


def test_grad_special_value_policy_matches_reference(device):
    """Gradients follow the documented policy on every backend, as autograd through the
    reference does: masked classes of a live row get 0; a row with no entropy (all -inf, a NaN,
    a +inf) gets NaN everywhere, never a silent 0."""
    x = make_logits((5, 8), torch.float32, device)
    x[0, ::3] = -INF  # masked classes
    x[1, :] = -INF  # all masked
    x[2, 4] = math.nan
    x[3, 1] = INF
    clusters = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0], device=device)
    w = torch.rand(5, 3, device=device)
    cases = {
        "softmax_entropy": (
            lambda t: softmax_entropy(t).sum(),
            lambda t: softmax_entropy_ref(t).sum(),
        ),
        "entropy_gate": (
            lambda t: entropy_gate(t, 1.0, clusters, num_clusters=3).cluster_probs.mul(w).sum(),
            lambda t: entropy_gate_ref(t, 1.0, clusters, 3).cluster_probs.mul(w.double()).sum(),
        ),
    }
    for name, (ours, ref) in cases.items():
        xo = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(ours(xo), xo)
        xr = x.double().requires_grad_()
        (gr,) = torch.autograd.grad(ref(xr), xr)
        assert torch.equal(g.isnan(), gr.isnan()), name
        assert g[1:4].isnan().all(), name
        assert (g[0, ::3] == 0).all() and (gr[0, ::3] == 0).all(), name
        assert_close(g[[0, 4]], gr[[0, 4]].float())


def test_softmax_entropy_gradcheck(device):
    x = make_logits((3, 7), torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: softmax_entropy(t, base=2), (x,))
    xm = x.detach().clone()
    xm[:, 0] = -INF
    xm.requires_grad_()
    assert torch.autograd.gradcheck(softmax_entropy, (xm,))


# ---- entropy_gate ---------------------------------------------------------------------------------


def _random_clusters(C: int, S: int, device, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.arange(S), torch.randint(0, S, (C - S,), generator=g)])
    return ids[torch.randperm(C, generator=g)].to(device)


def _assert_gate_matches(out: EntropyGate, x: torch.Tensor, thr: float, clusters, S):
    ref = entropy_gate_ref(x.double(), thr, clusters, S)
    assert_close(out.entropy, ref.entropy)
    assert torch.equal(out.uncertain, out.entropy >= thr)
    clear = (ref.entropy - thr).abs() > 1e-4  # away from the threshold, both must agree
    assert torch.equal(out.uncertain[clear], ref.uncertain[clear])
    assert torch.equal(out.prediction, x.argmax(dim=-1))
    if clusters is None:
        assert out.cluster_probs is None and out.cluster is None
        return
    assert_close(out.cluster_probs, ref.cluster_probs)
    top2 = ref.cluster_probs.topk(min(2, S), dim=-1).values
    decided = (top2[:, 0] - top2[:, -1] > 1e-4) if S > 1 else torch.ones_like(clear)
    assert torch.equal(out.cluster[decided], ref.cluster[decided])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "N,C,S", [(17, 10, 3), (64, 100, 10), (5, 1000, 7), (3, 5000, 40), (4, 1, 1)]
)
def test_entropy_gate_matches_reference(device, dtype, N, C, S):
    x = make_logits((N, C), dtype, device)
    thr = 0.5 * math.log(max(C, 2))
    _assert_gate_matches(entropy_gate(x, thr), x, thr, None, None)
    clusters = _random_clusters(C, S, device)
    _assert_gate_matches(entropy_gate(x, thr, clusters), x, thr, clusters, S)
    if S + 2 <= C:  # two empty clusters
        _assert_gate_matches(
            entropy_gate(x, thr, clusters, num_clusters=S + 2), x, thr, clusters, S + 2
        )
    else:  # more clusters than classes
        with pytest.raises(ValueError, match=rf"num_clusters must be <= C = {C}"):
            entropy_gate(x, thr, clusters, num_clusters=S + 2)


def test_entropy_gate_hand_computed_example(device):
    # Two rows, classes {0,1} in cluster 0 and {2,3} in cluster 1.
    x = torch.tensor(
        [[math.log(1.0), math.log(1.0), math.log(6.0), math.log(2.0)], [5.0, -INF, -INF, -INF]],
        device=device,
    )
    out = entropy_gate(x, 0.5, torch.tensor([0, 0, 1, 1], device=device))
    p = [0.1, 0.1, 0.6, 0.2]
    H0 = -sum(q * math.log(q) for q in p)
    assert_close(out.entropy, torch.tensor([H0, 0.0]))
    assert out.uncertain.tolist() == [True, False]
    assert out.prediction.tolist() == [2, 0]
    assert_close(out.cluster_probs, torch.tensor([[0.2, 0.8], [1.0, 0.0]]))
    assert out.cluster.tolist() == [1, 0]


def test_entropy_gate_ties_and_nan(device):
    x = torch.tensor(
        [
            [1.0, 3.0, 3.0, 0.0],  # tie: first index wins
            [0.0, 0.0, 0.0, 0.0],  # all equal: index 0; cluster tie: cluster 0
            [1.0, math.nan, 2.0, math.nan],  # NaN row: first NaN, NaN entropy
            [-INF, -INF, -INF, -INF],
        ],
        device=device,
    )
    clusters = torch.tensor([1, 0, 0, 1], device=device)
    out = entropy_gate(x, 1.0, clusters)
    assert out.prediction.tolist() == [1, 0, 1, 0]
    assert out.prediction.tolist() == x.argmax(dim=-1).tolist()
    assert out.cluster[1].item() == 0
    assert torch.isnan(out.entropy[2:]).all() and not out.uncertain[2:].any()
    assert torch.isnan(out.cluster_probs[2:]).all()
    assert out.cluster[2:].tolist() == [0, 0]


def test_entropy_gate_noncontiguous_and_empty(device):
    x = make_logits((12, 20), torch.float32, device).t()  # [20, 12], non-contiguous
    clusters = _random_clusters(12, 4, device)
    _assert_gate_matches(entropy_gate(x, 1.0, clusters), x, 1.0, clusters, 4)
    empty = entropy_gate(torch.empty(0, 6, device=device), 1.0, _random_clusters(6, 2, device))
    assert empty.entropy.shape == (0,) and empty.cluster_probs.shape == (0, 2)
    assert empty.cluster.shape == (0,)


def test_entropy_gate_grad_matches_reference(device):
    x = make_logits((11, 9), torch.float32, device).requires_grad_()
    clusters = _random_clusters(9, 3, device)
    wH, wC = torch.rand(11, device=device), torch.rand(11, 3, device=device)
    out = entropy_gate(x, 1.0, clusters)
    ((out.entropy * wH).sum() + (out.cluster_probs * wC).sum()).backward()
    x_ref = x.detach().double().requires_grad_()
    ref = entropy_gate_ref(x_ref, 1.0, clusters, 3)
    ((ref.entropy * wH.double()).sum() + (ref.cluster_probs * wC.double()).sum()).backward()
    assert_close(x.grad, x_ref.grad)


def _allocating(fn, *args):
    """(bytes that fn(*args) allocates on the CPU, its result): the profiler's allocator events,
    which c10's CPU allocator and our output cache (large outputs) both report."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        result = fn(*args)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cpu = torch.autograd.DeviceType.CPU
    return sum(e.nbytes() for e in events if e.device_type() == cpu and e.nbytes() > 0), result


@requires_ops
@pytest.mark.parametrize("rows", [4096, 262_144])  # a 160 KiB gradient and a cached 10 MiB one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_allocates_only_the_gradient(dtype, rows):
    """Issue 15: the backward's peak memory within 1.1x the gradient it returns, C = 10 included.
    Its only allocation is the gradient: the expanded gradient of .sum() / .mean() is read in
    place (not copied), and outputs without a gradient (lse, the gate's prediction, cluster,
    uncertainty) get none, instead of zero tensors as large as the gradient at C = 10."""
    x = make_logits((rows, 10), dtype).requires_grad_()
    clusters = _random_clusters(10, 3, "cpu")
    losses = {  # name: (ours, the reference's entropy) -> the loss
        "softmax_entropy sum": (lambda t: softmax_entropy(t), torch.sum),
        "softmax_entropy mean": (lambda t: softmax_entropy(t), torch.mean),
        "entropy_gate": (lambda t: entropy_gate(t, 1.0).entropy, torch.sum),
        "entropy_gate routed": (lambda t: entropy_gate(t, 1.0, clusters, 3).entropy, torch.mean),
    }
    for name, (entropy_of, reduce) in losses.items():
        entropy = entropy_of(x)
        allocated, (grad,) = _allocating(torch.autograd.grad, reduce(entropy), x)
        # Besides the gradient: the loss's own gradient (a 0-d 1.0) and, for .mean(), torch's
        # MeanBackward dividing the expanded 1.0 by N into a new [N] tensor (not ours to save).
        mean_backward = entropy.numel() * entropy.element_size() if reduce is torch.mean else 0
        assert 0 <= allocated - x.numel() * x.element_size() - mean_backward <= 64, name
        x_ref = x.detach().double().requires_grad_()
        (want,) = torch.autograd.grad(reduce(softmax_entropy_ref(x_ref)), x_ref)
        assert_close(grad, want)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset"])
@pytest.mark.parametrize(("n", "c"), [(5, 1), (3, 3), (7, 9), (2, 67)])
def test_gate_grad_at_any_alignment_and_row_length(device, dtype, offset, n, c):
    """The CUDA backward reads and writes 16-byte packs when the logits start on a 16-byte
    boundary (packs then span rows when C is not a multiple of the pack, and a tail shorter than
    a pack is left over) and one element at a time when they do not (a view at an odd offset):
    both agree with the reference, cluster gradient included."""
    flat = make_logits((offset + n * c,), dtype, device)
    x = flat[offset:].view(n, c).requires_grad_()
    assert x.is_contiguous() and x.storage_offset() == offset
    S = min(c, 2)
    clusters = _random_clusters(c, S, device)
    wH, wC = torch.rand(n, device=device), torch.rand(n, S, device=device)
    out = entropy_gate(x, 1.0, clusters, num_clusters=S)
    ((out.entropy * wH).sum() + (out.cluster_probs * wC).sum()).backward()
    x_ref = x.detach().double().requires_grad_()
    ref = entropy_gate_ref(x_ref, 1.0, clusters, S)
    ((ref.entropy * wH.double()).sum() + (ref.cluster_probs * wC.double()).sum()).backward()
    assert x.grad.dtype == dtype
    assert_close(x.grad, x_ref.grad)


def test_entropy_gate_gradcheck(device):
    x = make_logits((4, 6), torch.float64, device).requires_grad_()
    clusters = _random_clusters(6, 3, device)
    assert torch.autograd.gradcheck(lambda t: entropy_gate(t, 1.0, clusters).entropy, (x,))
    assert torch.autograd.gradcheck(lambda t: entropy_gate(t, 1.0, clusters).cluster_probs, (x,))
    assert torch.autograd.gradcheck(
        lambda t: tuple(entropy_gate(t, 1.0, clusters)[i] for i in (0, 3)), (x,)
    )


# ---- max_entropy_loss -----------------------------------------------------------------------------


def test_max_entropy_loss_formula(device):
    x = make_logits((6, 10), torch.float32, device)
    H2 = ref64(x) / math.log(2)
    expected = -torch.log(math.log2(10) - H2 + MAX_ENTROPY_EPS)
    assert_close(max_entropy_loss(x, reduction="none"), expected)
    assert_close(max_entropy_loss(x), expected.mean())
    assert_close(max_entropy_loss(x, reduction="sum"), expected.sum())
    assert_close(max_entropy_loss(x.t(), dim=0, reduction="none"), expected)


def test_max_entropy_loss_uniform_is_finite_peak(device):
    # A rounding gap below 0 bits is clamped, so the uniform distribution gives -log(eps)
    # exactly (up to float32), for C a power of two or not.
    for classes in (7, 8, 10):
        loss = max_entropy_loss(torch.zeros(3, classes, device=device), reduction="none")
        assert_close(loss, torch.full_like(loss, -math.log(MAX_ENTROPY_EPS)))


def test_max_entropy_loss_grows_with_entropy(device):
    x = make_logits((1, 5), torch.float32, device, scale=2.0)
    sharp, soft = max_entropy_loss(x * 3), max_entropy_loss(x / 3)
    assert soft > sharp
    xg = x.clone().requires_grad_()
    max_entropy_loss(xg).backward()
    # Gradient descent on the loss lowers entropy; ascent (what an augmenter does) raises it.
    with torch.no_grad():
        stepped = xg + 0.1 * xg.grad
    assert softmax_entropy(stepped) > softmax_entropy(x)


# ---- 7. bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (
            lambda: softmax_entropy(torch.ones(3, 4, dtype=torch.int64)),
            ValueError,
            "floating-point",
        ),
        (lambda: softmax_entropy([1.0, 2.0]), TypeError, "torch.Tensor"),
        (lambda: softmax_entropy(torch.ones(())), ValueError, "at least 1 dimension"),
        (lambda: softmax_entropy(torch.ones(3, 4), dim=2), ValueError, "dim=2 is out of range"),
        (lambda: softmax_entropy(torch.ones(3, 0)), ValueError, "empty class dimension"),
        (lambda: softmax_entropy(torch.ones(3, 4), base=1), ValueError, "base"),
        (lambda: softmax_entropy(torch.ones(3, 4), base=-2.0), ValueError, "base"),
        (lambda: entropy_gate(torch.ones(4), 1.0), ValueError, "at least 2 dimension"),
        (lambda: entropy_gate(torch.ones(2, 3, 4), 1.0), ValueError, "2-D"),
        (lambda: entropy_gate(torch.ones(2, 0), 1.0), ValueError, "empty class dimension"),
        (lambda: entropy_gate(torch.ones(2, 3), math.nan), ValueError, "threshold must be finite"),
        (lambda: entropy_gate(torch.ones(2, 3), math.inf), ValueError, "threshold must be finite"),
        (
            lambda: entropy_gate(torch.ones(2, 3), 1.0, torch.tensor([0, 1])),
            ValueError,
            r"shape \[C\] = \[3\]",
        ),
        (
            lambda: entropy_gate(torch.ones(2, 3), 1.0, torch.tensor([0, 1, 1], dtype=torch.int32)),
            ValueError,
            "int64",
        ),
        (
            lambda: entropy_gate(torch.ones(2, 3), 1.0, torch.tensor([0, -1, 1])),
            ValueError,
            "ids >= 0",
        ),
        (
            lambda: entropy_gate(torch.ones(2, 3), 1.0, torch.tensor([0, 1, 2]), num_clusters=2),
            ValueError,
            r"\[0, num_clusters = 2\)",
        ),
        (
            lambda: entropy_gate(torch.ones(2, 3), 1.0, torch.tensor([0, 1, 2]), num_clusters=0),
            ValueError,
            "num_clusters must be an int >= 1",
        ),
        (
            lambda: entropy_gate(torch.ones(2, 3), 1.0, None, num_clusters=2),
            ValueError,
            "without clusters",
        ),
        (  # an [N, 2**40] cluster mass is never allocated
            lambda: entropy_gate(
                torch.ones(2, 3), 1.0, torch.tensor([0, 1, 2]), num_clusters=2**40
            ),
            ValueError,
            r"num_clusters must be <= C = 3 \(one cluster id per class\)",
        ),
        (
            lambda: entropy_gate(torch.ones(2, 3), 1.0, torch.tensor([0, 1, 2**40])),
            ValueError,
            r"clusters must hold ids in \[0, C = 3\)",
        ),
        (
            lambda: entropy_gate(
                torch.ones(2, 3), 1.0, torch.zeros(3, dtype=torch.int64, device="meta")
            ),
            ValueError,
            "device",
        ),
        (lambda: max_entropy_loss(torch.ones(2, 3), reduction="avg"), ValueError, "reduction"),
        (lambda: max_entropy_loss(torch.ones(2, 3), eps=0.0), ValueError, "eps"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@requires_ops
def test_kernel_checks_cluster_ids_directly():
    """The C++ op itself never indexes out of bounds, even when the wrapper is bypassed."""
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"ids in \[0, num_clusters = 2\)"):
        torch.ops.labelkit.entropy_gate(x, 1.0, torch.tensor([0, 1, 5, 1]), 2)
    with pytest.raises(RuntimeError, match="floating-point"):
        torch.ops.labelkit.softmax_entropy(torch.ones(2, 3, dtype=torch.int32))


@requires_ops
def test_backward_ops_check_shapes_and_devices(device):
    """The backward kernels check every tensor they read, also when called directly."""
    x = make_logits((4, 5), torch.float32, device)
    H, lse = torch.ops.labelkit.softmax_entropy(x)
    backward = torch.ops.labelkit._softmax_entropy_backward
    with pytest.raises(RuntimeError, match=r"grad must have shape \[4\]"):
        backward(torch.ones(3, device=device), x, H, lse)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[4, 2\]"):
        backward(torch.ones(4, device=device), x, H, lse[:2])
    clusters = _random_clusters(5, 2, device)
    gate = torch.ops.labelkit.entropy_gate(x, 1.0, clusters, 2)
    gate_backward = torch.ops.labelkit._entropy_gate_backward
    with pytest.raises(RuntimeError, match="grad_cluster_probs must have the shape"):
        gate_backward(None, torch.ones(4, 3, device=device), x, gate[0], gate[5], clusters, gate[3])
    with pytest.raises(RuntimeError, match="grad_cluster_probs given without clusters"):
        gate_backward(None, torch.ones(4, 2, device=device), x, gate[0], gate[5], None, gate[3])
    # Another device anywhere, an unused tensor included, is an error (meta dispatches to the
    # fake kernel, CUDA beside CPU to the CUDA kernel: both must refuse).
    other = "cpu" if device == "cuda" else "meta"
    with pytest.raises(RuntimeError, match="must be on the logits' device"):
        backward(torch.ones(4, device=other), x, H, lse)
    with pytest.raises(RuntimeError, match="every tensor must be on the logits' device"):
        gate_backward(
            torch.ones(4, device=device), None, x, gate[0], gate[5], clusters.to(other), gate[3]
        )
    with pytest.raises(RuntimeError, match="every tensor must be on the logits' device"):
        gate_backward(
            torch.ones(4, device=device), None, x, gate[0], gate[5], None, gate[3].to(other)
        )


def test_grad_accurate_for_large_logits(device):
    """The backward's saved log-sum-exp is a (max, log-sum) pair: with logits near 1e4 their
    sum would round log-sum to float32's spacing there (~1e-3) and every p_j with it."""
    x = (make_logits((6, 50), torch.float64, device) + 1e4).float().requires_grad_()
    softmax_entropy(x).sum().backward()
    x64 = x.detach().double().requires_grad_()
    softmax_entropy_ref(x64).sum().backward()
    assert_close(x.grad, x64.grad.float())


def test_double_backward_is_a_clear_error(device):
    x = make_logits((3, 4), torch.float64, device).requires_grad_()
    (g,) = torch.autograd.grad(softmax_entropy(x).sum(), x, create_graph=True)
    if not _ext.HAS_OPS:  # the reference is plain autograd: twice differentiable
        torch.autograd.grad(g.sum(), x)
        return
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), x)


def test_empty_cluster_of_a_masked_or_nan_row_has_zero_mass(device):
    """The NaN/-inf policy is the reference's on every backend: a cluster with no class keeps
    mass 0; the others are NaN when the row has no finite softmax."""
    x = torch.tensor([[-INF, -INF, -INF], [0.0, math.nan, 1.0], [0.0, 1.0, 2.0]], device=device)
    clusters = torch.tensor([0, 0, 2], device=device)  # cluster 1 is empty
    out = entropy_gate(x, 1.0, clusters, num_clusters=3)
    ref = entropy_gate_ref(x, 1.0, clusters, 3)
    assert out.cluster_probs[:, 1].tolist() == [0.0, 0.0, 0.0]
    assert_close(out.cluster_probs, ref.cluster_probs)
    assert out.cluster.tolist() == ref.cluster.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_more_rows_than_one_cuda_grid():
    """Rows beyond the first grid's reach are handled by the grid-stride loops."""
    # A grid has at most 32 blocks of 256 threads per SM (csrc/ops/cuda/grid.h); the farthest
    # reaching kernel, the packed backward, takes 4 floats a thread. Twice its reach in floats
    # at 2 logits a row: 4.3 M rows on an H100, 66 K on the 2 SMs `make racecheck` emulates.
    rows = torch.cuda.get_device_properties(0).multi_processor_count * 32 * 256 * 4
    x = make_logits((rows, 2), torch.float32, "cuda").requires_grad_()
    clusters = torch.tensor([0, 1], device="cuda")
    out = entropy_gate(x, 0.5, clusters, num_clusters=2)
    ref = entropy_gate_ref(x.detach(), 0.5, clusters, 2)
    assert_close(out.entropy, ref.entropy)
    assert_close(out.cluster_probs, ref.cluster_probs)
    out.entropy.sum().backward()
    x_ref = x.detach().requires_grad_()
    softmax_entropy_ref(x_ref).sum().backward()
    assert_close(x.grad, x_ref.grad)


# ---- 4. opcheck ---------------------------------------------------------------------------------


@requires_ops
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    x = make_logits((5, 7), torch.float32, device).requires_grad_(requires_grad)
    x_half = make_logits((4, 3, 6), torch.bfloat16, device).requires_grad_(requires_grad)
    clusters = _random_clusters(7, 3, device)
    torch.library.opcheck(torch.ops.labelkit.softmax_entropy.default, (x,))
    torch.library.opcheck(torch.ops.labelkit.softmax_entropy.default, (x_half,))
    torch.library.opcheck(torch.ops.labelkit.entropy_gate.default, (x, 0.7, clusters, 3))
    torch.library.opcheck(torch.ops.labelkit.entropy_gate.default, (x, 0.7, None, 0))
    H, lse = torch.ops.labelkit.softmax_entropy(x.detach())
    torch.library.opcheck(
        torch.ops.labelkit._softmax_entropy_backward.default,
        (torch.rand_like(H), x.detach(), H, lse),
    )
    gate = torch.ops.labelkit.entropy_gate(x.detach(), 0.7, clusters, 3)
    for g_entropy, g_probs in ((torch.rand_like(H), torch.rand(5, 3, device=device)),
                               (None, torch.rand(5, 3, device=device)), (torch.rand_like(H), None)):  # fmt: skip
        torch.library.opcheck(
            torch.ops.labelkit._entropy_gate_backward.default,
            (g_entropy, g_probs, x.detach(), gate[0], gate[5], clusters, gate[3]),
        )


# ---- 5. torch.compile ---------------------------------------------------------------------------


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x = make_logits((8, 12), torch.float32).requires_grad_()
    clusters = _random_clusters(12, 4, "cpu")

    def fn(t):
        gate = entropy_gate(t, 1.5, clusters, num_clusters=4)
        loss = max_entropy_loss(t) + softmax_entropy(t, base=2).sum() + gate.cluster_probs.sum()
        return loss, gate.prediction, gate.uncertain

    compiled = torch.compile(fn, fullgraph=True)
    eager_loss, eager_pred, eager_unc = fn(x)
    (g_eager,) = torch.autograd.grad(eager_loss, x)
    loss, pred, unc = compiled(x)
    (g_comp,) = torch.autograd.grad(loss, x)
    assert_close(loss, eager_loss)
    assert torch.equal(pred, eager_pred) and torch.equal(unc, eager_unc)
    assert_close(g_comp, g_eager)


def test_compile_dynamic_shapes_match_eager():
    torch._dynamo.reset()
    clusters = _random_clusters(9, 3, "cpu")

    def fn(t):
        gate = entropy_gate(t, 1.0, clusters, num_clusters=3)
        return softmax_entropy(t).sum() + gate.cluster_probs.sum(), gate.prediction

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for rows in (5, 17, 33):
        x = make_logits((rows, 9), torch.float32, seed=rows).requires_grad_()
        loss, pred = compiled(x)
        eager_loss, eager_pred = fn(x)
        assert_close(loss, eager_loss)
        assert torch.equal(pred, eager_pred)
        assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(eager_loss, x)[0])


def test_compile_dynamic_takes_scalar_arguments():
    """Under dynamic=True the threshold, base and eps arguments are symbolic floats: the
    wrappers' finiteness checks used to stop fullgraph tracing (math.isfinite of one)."""
    torch._dynamo.reset()

    def fn(t, threshold, base, eps):
        gate = entropy_gate(t, threshold)
        return gate.uncertain, softmax_entropy(t, base=base), max_entropy_loss(t, eps=eps)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for rows, threshold, base, eps in ((5, 1.0, 2.0, 1e-6), (17, 0.5, 10.0, 1e-3)):
        x = make_logits((rows, 9), torch.float32, seed=rows)
        (uncertain, h, loss), want = compiled(x, threshold, base, eps), fn(x, threshold, base, eps)
        assert torch.equal(uncertain, want[0])
        assert_close(h, want[1])
        assert_close(loss, want[2])


def test_compile_requires_num_clusters():
    torch._dynamo.reset()
    clusters = torch.tensor([0, 1, 1])
    fn = torch.compile(lambda t: entropy_gate(t, 1.0, clusters).cluster, fullgraph=True)
    with pytest.raises(Exception, match="pass num_clusters under torch.compile"):
        fn(torch.randn(2, 3))


# ---- 6. autocast ----------------------------------------------------------------------------------


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_output_dtype(device, amp_dtype):
    lin = torch.nn.Linear(8, 5).to(device)
    x = torch.randn(6, 8, device=device)
    with torch.autocast(device_type=device, dtype=amp_dtype):
        logits = lin(x)
        assert logits.dtype == amp_dtype
        H = softmax_entropy(logits)
        gate = entropy_gate(logits, 1.0, torch.tensor([0, 1, 1, 0, 2], device=device))
        loss = max_entropy_loss(logits)
        H32 = softmax_entropy(logits.float())
    assert H.dtype == gate.entropy.dtype == gate.cluster_probs.dtype == loss.dtype == torch.float32
    assert H32.dtype == torch.float32
    assert_close(H, ref64(logits))


# ---- 9. property tests (index arithmetic: strides, argmax, cluster bins) -----------------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 9),
    c=st.integers(1, 70),
    s=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    masked=st.floats(0.0, 0.5),
    transpose=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_entropy_gate_property(n, c, s, seed, masked, transpose, dtype):
    s = min(s, c)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c, n, generator=g).t() if transpose else torch.randn(n, c, generator=g)
    x = (x * 4).round() / 2  # coarse values make argmax ties common
    mask = torch.rand(n, c, generator=g) < masked
    mask[:, 0] = False  # keep at least one live class per row
    x = x.masked_fill(mask, -INF).to(dtype)
    clusters = _random_clusters(c, s, "cpu", seed=seed)
    thr = 0.7
    _assert_gate_matches(entropy_gate(x, thr, clusters), x, thr, clusters, s)
    assert_close(softmax_entropy(x), ref64(x))


# ---- 8. the fallback, and install facts -----------------------------------------------------------


def test_fallback_routing_matches_build():
    for op in ("softmax_entropy", "entropy_gate"):
        assert _ext.has_kernel(op, "cpu") == _ext.HAS_OPS
    if not _ext.HAS_OPS:
        assert labelkit_ext.LOAD_ERROR


def test_cluster_mass_reference_sums_to_one():
    x = make_logits((5, 9), torch.float64)
    mass = cluster_mass_ref(x, _random_clusters(9, 4, "cpu"), 4)
    torch.testing.assert_close(mass.sum(-1), torch.ones(5, dtype=torch.float64))
