"""Fuzz tests of the pool-scoring family (uncertainty, cosine_topk, cosine_reduce, kcenter_greedy,
badge_select): odd shapes, layouts, extreme values (the uncertainty kernels share the entropy
family's row loops: rows of every length against their vector tails), bad arguments, dtypes and
devices. Each input either matches the reference or raises the documented error
(python_tests/fuzzing.py; docs/testing.md)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOLERANCES
from fuzzing import (
    FLOAT_DTYPES,
    NON_FLOAT_DTYPES,
    Raises,
    arrange,
    assert_matches,
    check_op,
    devices,
    float_tensors,
    layouts,
    other_device,
    shapes,
)
from hypothesis import given
from hypothesis import strategies as st

from labelkit_ext import badge_select, cosine_reduce, cosine_topk, kcenter_greedy, uncertainty
from labelkit_ext.reference.scoring import (
    MC_METHODS,
    UNCERTAINTY_METHODS,
    badge_select_ref,
    badge_uniforms,
    cosine_reduce_ref,
    cosine_topk_ref,
    normalize_rows,
    uncertainty_ref,
)

pytestmark = pytest.mark.fuzz

ANY_DTYPE = st.sampled_from(FLOAT_DTYPES * 3 + NON_FLOAT_DTYPES)
EPS = st.sampled_from([1e-8] * 6 + [0.0, -1.0, math.nan, math.inf, 1e-30, 1.0])


def _values(data, shape, dtype, device, specials=True) -> torch.Tensor:
    if dtype.is_floating_point:
        x = data.draw(float_tensors(shape, dtype, device, specials=specials))
    else:
        x = torch.randint(0, 3, tuple(shape)).to(dtype=dtype, device=device)
    return arrange(x, data.draw(layouts()))


def _float_errors(x: torch.Tensor, name: str, op: str, dims: tuple[int, ...]) -> list[Raises]:
    errors = []
    if not x.is_floating_point():
        errors.append(Raises(ValueError, f"{op}: {name} must be a floating-point tensor"))
    if x.dim() not in dims:
        errors.append(Raises(ValueError, f"{op}: {name} must be "))
    return errors


def _finite_errors(x: torch.Tensor, name: str, op: str) -> list[Raises]:
    if x.device.type == "meta":  # (a device-mismatch case: that error comes first)
        return []
    if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        return [Raises(ValueError, f"{op}: {name} must be finite")]
    return []


# ---- uncertainty ------------------------------------------------------------------------------------


def _uncertainty_errors(x: torch.Tensor, method, from_logits) -> list[Raises]:
    op = "uncertainty"
    errors = []
    if method not in UNCERTAINTY_METHODS:
        errors.append(Raises(ValueError, f"{op}: method must be one of"))
    if not isinstance(from_logits, bool):
        errors.append(Raises(TypeError, f"{op}: from_logits must be a bool"))
    if method in MC_METHODS:
        dims = (3,)
    elif method == "variation_ratio":
        dims = (2, 3)
    else:
        dims = (2,)
    errors += _float_errors(x, "scores", op, dims)
    if x.dim() >= 1 and x.shape[-1] == 0:
        errors.append(Raises(ValueError, f"{op}: scores has an empty class dimension"))
    if x.dim() == 3 and x.shape[0] == 0:
        errors.append(Raises(ValueError, f"{op}: scores has no Monte-Carlo samples"))
    if from_logits is False:
        errors += _probability_errors(x, "scores", op)
    return errors


def _probability_errors(x: torch.Tensor, name: str, op: str) -> list[Raises]:
    """Entries outside [0, 1] (NaN and inf included) are refused where probabilities are due."""
    if x.is_floating_point() and x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
        return [Raises(ValueError, f"{op}: {name} must be probabilities in")]
    return []


@given(data=st.data())
def test_uncertainty_fuzz(data):
    device = data.draw(devices())
    dtype = data.draw(ANY_DTYPE)
    method = data.draw(st.sampled_from(list(UNCERTAINTY_METHODS) * 3 + ["random"]))
    from_logits = data.draw(st.sampled_from([True] * 4 + [False] * 3 + [1]))
    shape = data.draw(shapes(min_dims=1, max_dims=4, max_size=5))
    if len(shape) in (2, 3):
        shape = (*shape[:-1], data.draw(st.integers(0, 40)))  # rows end anywhere in a vector
    x = _values(data, shape, dtype, device)
    if (
        from_logits is False
        and dtype.is_floating_point
        and x.dim()
        and data.draw(st.integers(0, 4))
    ):
        p = torch.softmax(x.double().nan_to_num(0.0, 0.0, 0.0), -1).to(dtype)
        x = arrange(p, data.draw(layouts()))  # probabilities (mostly): a softmax output
    expect = _uncertainty_errors(x, method, from_logits)
    check_op(
        lambda: uncertainty(x, method, from_logits),
        lambda: uncertainty_ref(x, method, from_logits),
        expect,
    )


@given(data=st.data())
def test_uncertainty_valid_fuzz(data):
    """Valid arguments only (the mixed test above compares about a quarter of its examples):
    every method on logits (special values included) or on softmax probabilities."""
    device = data.draw(devices())
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    method = data.draw(st.sampled_from(list(UNCERTAINTY_METHODS)))
    n, c = data.draw(st.integers(0, 5)), data.draw(st.integers(1, 40))
    mc = method in MC_METHODS or (method == "variation_ratio" and data.draw(st.booleans()))
    shape = (data.draw(st.integers(1, 3)), n, c) if mc else (n, c)
    x = data.draw(float_tensors(shape, dtype, device))
    from_logits = data.draw(st.booleans())
    if not from_logits:
        x = torch.softmax(x.double().nan_to_num(0.0, 0.0, 0.0), -1).to(dtype)
    x = arrange(x, data.draw(layouts()))
    check_op(
        lambda: uncertainty(x, method, from_logits),
        lambda: uncertainty_ref(x, method, from_logits),
    )


@given(data=st.data())
def test_uncertainty_grad_fuzz(data):
    """Gradients of finite logits (huge and denormal ones included) against the reference's."""
    device = data.draw(devices())
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    method = data.draw(st.sampled_from([m for m in UNCERTAINTY_METHODS if m != "variation_ratio"]))
    n, c = data.draw(st.integers(0, 5)), data.draw(st.integers(1, 40))
    shape = (data.draw(st.integers(1, 3)), n, c) if method in MC_METHODS else (n, c)
    x = data.draw(float_tensors(shape, dtype, device))
    x = torch.where(x.isfinite(), x, torch.zeros_like(x))  # NaN/inf gradients are undefined
    x = arrange(x, data.draw(layouts())).detach().requires_grad_()
    w = torch.rand(n, dtype=torch.float64, device=device)
    (uncertainty(x, method) * w).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (uncertainty_ref(x_ref, method) * w).sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    keep = _untied_rows(x.detach(), method)
    torch.testing.assert_close(
        x.grad[..., keep, :], x_ref.grad[..., keep, :], equal_nan=True, **TOLERANCES[dtype]
    )


def _untied_rows(x: torch.Tensor, method: str) -> torch.Tensor:
    """[N] rows whose gradient is defined: margin and least confidence differentiate max p (and
    the runner-up), which has a kink where the top probabilities tie; either side is a valid
    answer."""
    n = x.shape[-2]
    if method not in ("margin", "least_confidence") or x.shape[-1] < 2 or n == 0:
        return torch.ones(n, dtype=torch.bool, device=x.device)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    p = torch.softmax(x.to(acc), -1)  # ties after rounding count: logits 1e-9 apart tie in p
    top = p.topk(min(3, x.shape[-1]), dim=-1).values
    tied = (top[..., :-1] == top[..., 1:]).any(-1)
    return ~tied.reshape(-1, n).any(0)


# ---- cosine similarities -------------------------------------------------------------------------------


def _pair_errors(q: torch.Tensor, k: torch.Tensor, op: str) -> list[Raises]:
    errors = _float_errors(q, "queries", op, (2,)) + _float_errors(k, "keys", op, (2,))
    if q.dim() == 2 and k.dim() == 2:
        if q.shape[1] != k.shape[1]:
            errors.append(
                Raises(ValueError, f"{op}: queries and keys must have the same feature size")
            )
        elif q.shape[1] == 0:
            errors.append(
                Raises(ValueError, f"{op}: queries and keys have an empty feature dimension")
            )
    if q.dtype != k.dtype:
        errors.append(Raises(ValueError, f"{op}: queries and keys must have the same dtype"))
    if q.device != k.device:
        errors.append(Raises(ValueError, f"{op}: queries and keys must be on the same device"))
    return errors + _finite_errors(q, "queries", op) + _finite_errors(k, "keys", op)


def _eps_tile_errors(eps, tile, op: str) -> list[Raises]:
    errors = []
    if not (math.isfinite(eps) and eps > 0):
        errors.append(Raises(ValueError, f"{op}: eps must be a finite float > 0"))
    if tile is not None and tile < 1:
        errors.append(Raises(ValueError, f"{op}: tile_size must be >= 1"))
    return errors


@st.composite
def query_key_pairs(draw, device):
    """queries [N, D] and keys [M, D], mostly valid: finite values at a drawn scale (zero rows
    and ties included), sometimes a special value, another rank, a D, dtype or device mismatch."""
    dtype = draw(ANY_DTYPE)
    n, m, d = draw(st.integers(0, 12)), draw(st.integers(0, 12)), draw(st.integers(0, 6))
    specials = draw(st.integers(0, 9)) == 0
    q = draw(float_tensors((n, d), dtype, device, specials)) if dtype.is_floating_point else None
    if q is None:
        q = torch.randint(0, 3, (n, d)).to(dtype=dtype, device=device)
    k_dtype = dtype if draw(st.integers(0, 9)) else draw(st.sampled_from(FLOAT_DTYPES))
    k_shape = (
        (m, d) if draw(st.integers(0, 9)) else draw(st.sampled_from([(m, d + 1), (m,), (1, m, d)]))
    )
    if k_dtype.is_floating_point:
        k = draw(float_tensors(k_shape, k_dtype, device, specials))
    else:
        k = torch.randint(0, 3, k_shape).to(dtype=k_dtype, device=device)
    if draw(st.integers(0, 19)) == 0:
        k = k.to(other_device(device))
    return arrange(q, draw(layouts())), arrange(k, draw(layouts()))


@st.composite
def valid_query_key_pairs(draw, device):
    """queries [N, D] and keys [M >= 1, D >= 1] of one float dtype, in drawn layouts; special
    values made finite (the documented non-finite errors are the mixed tests' part)."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    n, m, d = draw(st.integers(0, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 6))
    specials = draw(st.integers(0, 3)) == 0
    q = draw(float_tensors((n, d), dtype, device, specials)).nan_to_num()
    k = draw(float_tensors((m, d), dtype, device, specials)).nan_to_num()
    return arrange(q, draw(layouts())), arrange(k, draw(layouts()))


def _compare_topk(q, k, eps):
    """Values within the dtype's tolerance of the reference's; the index of each value really
    holds it (ties and near-ties may order differently after rounding), best first."""

    def compare(actual, expected):
        (v, i), (rv, _) = actual, expected
        assert_matches(v, rv)
        assert i.dtype == torch.int64 and i.shape == v.shape
        if not v.numel():
            return
        # the reference's normalisation (in the accumulation dtype: a norm that overflows it
        # gives 0 similarities in every implementation), then products in float64
        qn, kn = normalize_rows(q, eps).double().cpu(), normalize_rows(k, eps).double().cpu()
        held = (qn @ kn.T).gather(1, i.cpu())
        torch.testing.assert_close(held.to(v.dtype), v.cpu(), **TOLERANCES[v.dtype])
        assert len(set(i.flatten().tolist())) <= k.shape[0]
        assert all(len(set(row)) == len(row) for row in i.tolist())

    return compare


@given(data=st.data())
def test_cosine_topk_fuzz(data):
    device = data.draw(devices())
    q, k = data.draw(query_key_pairs(device))
    kk = data.draw(st.integers(-1, 14))
    largest = data.draw(st.booleans())
    eps, tile = data.draw(EPS), data.draw(st.one_of(st.none(), st.integers(0, 20)))
    op = "cosine_topk"
    expect = _pair_errors(q, k, op) + _eps_tile_errors(eps, tile, op)
    if kk < 1:
        expect.append(Raises(ValueError, f"{op}: k must be >= 1"))
    elif k.dim() == 2 and kk > k.shape[0]:
        expect.append(Raises(ValueError, f"{op}: k=.* is larger than the number of keys"))
    check_op(
        lambda: cosine_topk(q, k, kk, largest, eps=eps, tile_size=tile),
        lambda: tuple(cosine_topk_ref(q, k, kk, largest, eps, tile)),
        expect,
        _compare_topk(q, k, eps),
    )


@given(data=st.data())
def test_cosine_topk_valid_fuzz(data):
    """Valid arguments only, so every example is compared (the mixed test above mostly draws
    documented errors)."""
    q, k = data.draw(valid_query_key_pairs(data.draw(devices())))
    m = k.shape[0]
    kk, largest = data.draw(st.integers(1, m)), data.draw(st.booleans())
    tile = data.draw(st.one_of(st.none(), st.integers(1, 20)))
    check_op(
        lambda: cosine_topk(q, k, kk, largest, tile_size=tile),
        lambda: tuple(cosine_topk_ref(q, k, kk, largest, 1e-8, tile)),
        (),
        _compare_topk(q, k, 1e-8),
    )


@given(data=st.data())
def test_cosine_reduce_fuzz(data):
    device = data.draw(devices())
    q, k = data.draw(query_key_pairs(device))
    reduce = data.draw(st.sampled_from(["max", "min", "mean", "sum"] * 2 + ["median"]))
    eps, tile = data.draw(EPS), data.draw(st.one_of(st.none(), st.integers(0, 20)))
    op = "cosine_reduce"
    expect = _pair_errors(q, k, op) + _eps_tile_errors(eps, tile, op)
    if reduce == "median":
        expect.append(Raises(ValueError, f"{op}: reduce must be one of"))
    if k.dim() == 2 and k.shape[0] == 0:
        expect.append(Raises(ValueError, f"{op}: keys is empty"))
    check_op(
        lambda: cosine_reduce(q, k, reduce, eps=eps, tile_size=tile),
        lambda: cosine_reduce_ref(q, k, reduce, eps, tile),
        expect,
    )


@given(data=st.data())
def test_cosine_reduce_valid_fuzz(data):
    """Valid arguments only: every reduction, tile and layout is compared."""
    q, k = data.draw(valid_query_key_pairs(data.draw(devices())))
    reduce = data.draw(st.sampled_from(["max", "min", "mean", "sum"]))
    tile = data.draw(st.one_of(st.none(), st.integers(1, 20)))
    check_op(
        lambda: cosine_reduce(q, k, reduce, tile_size=tile),
        lambda: cosine_reduce_ref(q, k, reduce, 1e-8, tile),
    )


# ---- greedy selections ------------------------------------------------------------------------------------


def _selection_is_valid(picks: torch.Tensor, budget: int, n: int, labeled: list[int]) -> None:
    assert picks.dtype == torch.int64 and picks.shape == (budget,)
    got = picks.tolist()
    assert len(set(got)) == budget and all(0 <= i < n for i in got)
    assert not set(got) & set(labeled)


@given(data=st.data())
def test_kcenter_greedy_fuzz(data):
    """Bad arguments raise the documented errors; a valid call returns budget distinct,
    unlabeled, in-range indices, the same on a second call (deterministic)."""
    device = data.draw(devices())
    dtype = data.draw(ANY_DTYPE)
    n, d = data.draw(st.integers(0, 12)), data.draw(st.integers(0, 5))
    x = _values(data, (n, d), dtype, device, specials=data.draw(st.integers(0, 9)) == 0)
    labeled = data.draw(st.lists(st.integers(-2, n + 1), max_size=4))
    budget = data.draw(st.integers(-1, n + 1))
    metric = data.draw(st.sampled_from(["euclidean", "cosine", "manhattan"]))
    eps = data.draw(EPS)
    op = "kcenter_greedy"
    expect = _float_errors(x, "embeddings", op, (2,))
    if metric == "manhattan":
        expect.append(Raises(ValueError, f"{op}: metric must be one of"))
    if not (math.isfinite(eps) and eps > 0):
        expect.append(Raises(ValueError, f"{op}: eps must be a finite float > 0"))
    if any(not 0 <= i < n for i in labeled):
        expect.append(Raises(ValueError, f"{op}: labeled indices must lie in"))
    elif len(set(labeled)) != len(labeled):
        expect.append(Raises(ValueError, f"{op}: labeled indices must not repeat"))
    pool = n - len(set(labeled))
    if budget < 0:
        expect.append(Raises(ValueError, f"{op}: budget must be >= 0"))
    elif budget > pool:
        expect.append(Raises(ValueError, f"{op}: budget=.* is larger than the unlabeled pool"))
    elif budget > 0 and d == 0:
        expect.append(Raises(ValueError, f"{op}: embeddings has an empty feature dimension"))
    expect += _finite_errors(x, "embeddings", op)
    picks = check_op(lambda: kcenter_greedy(x, budget, labeled, metric, eps=eps), None, expect)
    if picks is not None:
        _selection_is_valid(picks.cpu(), budget, n, labeled)
        assert torch.equal(picks, kcenter_greedy(x, budget, labeled, metric, eps=eps))


@given(data=st.data())
def test_badge_select_fuzz(data):
    device = data.draw(devices())
    n, c, d = (
        data.draw(st.integers(0, 12)),
        data.draw(st.integers(0, 5)),
        data.draw(st.integers(0, 5)),
    )
    probs = _values(
        data, (n, c), data.draw(ANY_DTYPE), device, specials=data.draw(st.integers(0, 9)) == 0
    )
    if probs.is_floating_point() and probs.numel() and data.draw(st.integers(0, 3)):
        probs = torch.softmax(probs.double().nan_to_num(0.0, 0.0, 0.0), 1).to(probs.dtype)
    n_emb = n if data.draw(st.integers(0, 9)) else n + 1
    emb = _values(
        data, (n_emb, d), data.draw(st.sampled_from(FLOAT_DTYPES)), device, specials=False
    )
    if data.draw(st.integers(0, 19)) == 0:
        emb = emb.to(other_device(device))
    budget, seed = data.draw(st.integers(-1, n + 1)), data.draw(st.integers(-1, 3))
    op = "badge_select"
    expect = _float_errors(probs, "probs", op, (2,))
    if n_emb != n:
        expect.append(
            Raises(ValueError, f"{op}: probs and embeddings must have the same number of samples")
        )
    if emb.device != probs.device:
        expect.append(Raises(ValueError, f"{op}: probs and embeddings must be on the same device"))
    if budget < 0:
        expect.append(Raises(ValueError, f"{op}: budget must be >= 0"))
    elif budget > n:
        expect.append(Raises(ValueError, f"{op}: budget=.* is larger than the unlabeled pool"))
    elif budget > 0 and (c == 0 or d == 0):
        expect.append(
            Raises(ValueError, f"{op}: probs \\(C\\) and embeddings \\(D\\) must have non-empty")
        )
    if probs.is_floating_point() and probs.dtype != emb.dtype:
        expect.append(Raises(ValueError, f"{op}: probs and embeddings must have the same dtype"))
    if seed < 0:
        expect.append(Raises(ValueError, f"{op}: seed must be >= 0"))
    expect += _probability_errors(probs, "probs", op) + _finite_errors(emb, "embeddings", op)
    picks = check_op(lambda: badge_select(probs, emb, budget, seed), None, expect)
    if picks is not None:
        _selection_is_valid(picks.cpu(), budget, n, [])
        assert torch.equal(picks, badge_select(probs, emb, budget, seed))


def _assert_greedy_farthest(x, picks, labeled, metric, eps):
    """The core-set greedy's defining property, in float64 from the op's own inputs: without
    labels the first pick is nearest the mean; each later pick is a farthest unlabeled,
    unpicked sample from the centers so far (squared distances, up to the kernels' float32
    accumulation for half and float32 inputs)."""
    x64 = normalize_rows(x, eps).double().cpu() if metric == "cosine" else x.double().cpu()
    rtol = 1e-12 if x.dtype == torch.float64 else 1e-5
    centers = list(labeled)
    for step, pick in enumerate(picks.tolist()):
        if centers:
            d = torch.cdist(x64, x64[centers]).square().min(1).values
            d[centers] = -1.0
            assert d[pick] >= d.max() - rtol * max(1.0, float(d.max())), (step, pick)
        else:
            d = (x64 - x64.mean(0)).square().sum(1)
            assert d[pick] <= d.min() + rtol * max(1.0, float(d.max())), (step, pick)
        centers.append(pick)


@given(data=st.data())
def test_kcenter_greedy_valid_fuzz(data):
    """Valid, finite inputs only: every example is checked against the greedy property."""
    device = data.draw(devices())
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    n, d = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 5))
    x = data.draw(float_tensors((n, d), dtype, device, specials=False))
    x = arrange(x.nan_to_num(), data.draw(layouts()))  # a 1e5 scale overflows float16
    labeled = data.draw(st.lists(st.integers(0, n - 1), max_size=4, unique=True))
    budget = data.draw(st.integers(0, n - len(labeled)))
    metric = data.draw(st.sampled_from(["euclidean", "cosine"]))
    picks = kcenter_greedy(x, budget, labeled, metric)
    _selection_is_valid(picks.cpu(), budget, n, labeled)
    _assert_greedy_farthest(x, picks, labeled, metric, 1e-8)


@given(data=st.data())
def test_badge_select_valid_fuzz(data):
    """Valid inputs only: every example equals the reference's k-means++ draw (same uniforms)."""
    device = data.draw(devices())
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    n, c, d = (
        data.draw(st.integers(1, 12)),
        data.draw(st.integers(1, 5)),
        data.draw(st.integers(1, 5)),
    )
    logits = data.draw(float_tensors((n, c), dtype, device, specials=False))
    probs = torch.softmax(logits.double(), 1).to(dtype)
    emb = data.draw(float_tensors((n, d), dtype, device, specials=False)).nan_to_num()
    emb = arrange(emb, data.draw(layouts()))
    budget, seed = data.draw(st.integers(0, n)), data.draw(st.integers(0, 2**64 - 1))
    picks = badge_select(probs, emb, budget, seed)
    _selection_is_valid(picks.cpu(), budget, n, [])
    expected = badge_select_ref(probs, emb, budget, badge_uniforms(budget, seed))
    assert picks.tolist() == expected.tolist()
