"""Fuzz tests of the entropy family (softmax_entropy, entropy_gate, max_entropy_loss): odd shapes,
layouts, extreme values, bad ids, wrong dtypes and devices. Each input either matches the
reference or raises the documented error (python_tests/fuzzing.py; docs/testing.md)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CUDA, assert_close
from fuzzing import (
    FLOAT_DTYPES,
    NON_FLOAT_DTYPES,
    Raises,
    arrange,
    assert_device_assert_in_child,
    check_op,
    cpu_only_if,
    devices,
    float_tensors,
    index_tensors,
    layouts,
    other_device,
    out_of_range_ids,
    registered_op,
    shapes,
)
from hypothesis import given
from hypothesis import strategies as st

from labelkit_ext import EntropyGate, entropy_gate, max_entropy_loss, softmax_entropy
from labelkit_ext.ops.entropy import MAX_ENTROPY_EPS
from labelkit_ext.reference.entropy import (
    entropy_gate_ref,
    softmax_entropy_ref,
)

pytestmark = pytest.mark.fuzz

# Mostly floating inputs; now and then one the ops must reject.
ANY_DTYPE = st.sampled_from(FLOAT_DTYPES * 3 + NON_FLOAT_DTYPES)
BASES = st.sampled_from([None, 2, math.e, 10, 0.5, 1, 0, -2.0, math.inf, math.nan])
THRESHOLDS = st.one_of(st.floats(-1.0, 10.0), st.sampled_from([0.0, math.inf, -math.inf, math.nan]))


def _logits(data, shape, dtype, device) -> torch.Tensor:
    if dtype.is_floating_point:
        x = data.draw(float_tensors(shape, dtype, device))
    else:
        x = torch.randint(0, 3, tuple(shape)).to(dtype=dtype, device=device)
    return arrange(x, data.draw(layouts()))


def _logits_errors(x: torch.Tensor, op: str, min_dim: int) -> list[Raises]:
    errors = []
    if not x.is_floating_point():
        errors.append(Raises(ValueError, f"{op}: logits must be a floating-point tensor"))
    if x.dim() < min_dim:
        errors.append(Raises(ValueError, f"{op}: logits must have at least {min_dim} dimension"))
    return errors


def _dim_errors(x: torch.Tensor, dim: int, op: str) -> list[Raises]:
    if x.dim() == 0:
        return []
    if not -x.dim() <= dim < x.dim():
        return [Raises(ValueError, f"{op}: dim={dim} is out of range")]
    if x.shape[dim] == 0:
        return [Raises(ValueError, f"{op}: logits has an empty class dimension")]
    return []


# ---- softmax_entropy --------------------------------------------------------------------------------


@given(data=st.data())
def test_softmax_entropy_fuzz(data):
    device = data.draw(devices())
    x = _logits(data, data.draw(shapes(min_dims=0, max_dims=4)), data.draw(ANY_DTYPE), device)
    dim = data.draw(st.integers(-5, 4))
    base = data.draw(BASES)
    expect = _logits_errors(x, "softmax_entropy", 1) + _dim_errors(x, dim, "softmax_entropy")
    if base is not None and not (math.isfinite(base) and base > 0 and base != 1):
        expect.append(Raises(ValueError, "softmax_entropy: base must be finite, > 0 and != 1"))
    check_op(
        lambda: softmax_entropy(x, dim=dim, base=base),
        lambda: softmax_entropy_ref(x, dim=dim, base=base),
        expect,
    )


@given(data=st.data())
def test_softmax_entropy_valid_fuzz(data):
    """Valid arguments only (the mixed test above compares about a third of its examples):
    every class dimension, base and layout, special values included."""
    device = data.draw(devices())
    shape = data.draw(shapes(min_dims=1, max_dims=4, min_last=1))
    x = _logits(data, shape, data.draw(st.sampled_from(FLOAT_DTYPES)), device)
    dim = data.draw(st.sampled_from([d for d in range(-x.dim(), x.dim()) if x.shape[d] > 0]))
    base = data.draw(st.sampled_from([None, 2, math.e, 10, 0.5]))
    check_op(
        lambda: softmax_entropy(x, dim=dim, base=base),
        lambda: softmax_entropy_ref(x, dim=dim, base=base),
    )


@given(data=st.data())
def test_softmax_entropy_grad_fuzz(data):
    """Gradients of finite logits (huge and denormal ones included) against the reference's."""
    device = data.draw(devices())
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    shape = data.draw(shapes(min_dims=1, max_dims=3, min_last=1))
    x = data.draw(float_tensors(shape, dtype, device))
    x = torch.where(x.isfinite(), x, torch.zeros_like(x))  # NaN/inf gradients are undefined
    x = arrange(x, data.draw(layouts())).detach().requires_grad_()
    w = torch.rand(shape[:-1], dtype=torch.float64, device=device)
    (softmax_entropy(x) * w).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (softmax_entropy_ref(x_ref) * w).sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    assert_close(x.grad, x_ref.grad)


@given(data=st.data())
def test_softmax_entropy_backward_op_fuzz(data):
    """The registered backward op, Python bypassed: a grad, entropy or lse without one value per
    row must be a RuntimeError, never a read past their end."""
    device = data.draw(devices())
    op = registered_op("_softmax_entropy_backward", device)
    if op is None:
        pytest.skip(f"no compiled _softmax_entropy_backward kernel for {device}")
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    shape = data.draw(shapes(min_dims=1, max_dims=3, min_last=1))
    x = data.draw(float_tensors(shape, dtype, device))
    x = arrange(torch.where(x.isfinite(), x, torch.zeros_like(x)), data.draw(layouts()))
    rows = tuple(shape[:-1])
    H, lse = registered_op("softmax_entropy", device)(x)  # lse: a (max, log-sum) pair per row

    def resized(t: torch.Tensor, name: str) -> torch.Tensor:
        """``t`` with its rows cut or padded by a drawn amount (0: unchanged)."""
        extra = data.draw(st.sampled_from([0, 0, 0, 1, -1, 7]), label=name)
        if extra == 0:
            return t
        flat = t.reshape(math.prod(rows), *t.shape[len(rows) :])
        n = max(0, flat.shape[0] + extra)
        pad = flat.new_zeros(max(0, n - flat.shape[0]), *flat.shape[1:])
        return torch.cat([flat, pad])[:n]

    g = resized(torch.rand(rows, dtype=torch.float64, device=device), "grad")
    H, lse = resized(H, "entropy"), resized(lse, "lse")
    expect = [
        Raises(RuntimeError, f"{name} must have shape")
        for name, t, want in (("grad", g, rows), ("entropy", H, rows), ("lse", lse, (*rows, 2)))
        if tuple(t.shape) != want
    ][:1]

    def reference():
        x_ref = x.detach().clone().requires_grad_()
        H_ref = softmax_entropy_ref(x_ref)
        (gx,) = torch.autograd.grad(H_ref, x_ref, g.to(H_ref.dtype).reshape(rows))
        return gx

    check_op(lambda: op(g, x, H, lse), reference, expect)


# ---- entropy_gate -------------------------------------------------------------------------------------


@st.composite
def _clusters(draw, C: int, device: str):
    """(clusters or None, num_clusters or None, the documented errors that choice violates)."""
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter of the cases: no routing
        num = draw(st.sampled_from([None, None, 2]))
        return (
            None,
            num,
            [] if num is None else [Raises(ValueError, "num_clusters given without clusters")],
        )
    n = max(C, 0) + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))  # sometimes the wrong length
    n = max(n, 0)
    S = draw(st.integers(1, 6))
    num = draw(st.sampled_from([None, S, S + 2, S - 1, 0, -3]))
    ids = draw(index_tensors((n,), 0, S - 1))
    if n and draw(st.booleans()):
        # Without num_clusters any id >= 0 is valid (S = max + 1): keep those small enough for
        # the [N, S] output to fit in memory.
        bad = (
            out_of_range_ids(S)
            if num is not None
            else st.one_of(st.integers(-(2**63), -1), st.integers(S, S + 9))
        )
        ids[draw(st.integers(0, n - 1))] = draw(bad)
    dtype = draw(st.sampled_from([torch.int64] * 5 + [torch.int32]))
    on = draw(st.sampled_from([device] * 5 + [other_device(device)]))
    clusters = arrange(
        ids.to(device=on, dtype=dtype), draw(st.sampled_from(["contiguous", "strided", "offset"]))
    )
    errors = []
    if dtype != torch.int64:
        errors.append(Raises(ValueError, "entropy_gate: clusters must be int64"))
    if n != C:
        errors.append(Raises(ValueError, r"entropy_gate: clusters must have shape \[C\]"))
    if on != device:
        errors.append(Raises(ValueError, "entropy_gate: clusters must be on the logits' device"))
    if num is not None and num < 1:
        errors.append(Raises(ValueError, "entropy_gate: num_clusters must be an int >= 1"))
    elif num is not None and num > n:
        errors.append(Raises(ValueError, "entropy_gate: num_clusters must be <= C"))
    if n and int(ids.min()) < 0:
        errors.append(Raises(ValueError, "entropy_gate: clusters must hold ids >= 0"))
    elif n and num is not None and int(ids.max()) >= num:
        errors.append(
            Raises(ValueError, r"entropy_gate: clusters must hold ids in \[0, num_clusters")
        )
    elif n and num is None and int(ids.max()) >= n:
        errors.append(Raises(ValueError, r"entropy_gate: clusters must hold ids in \[0, C = "))
    return clusters, num, errors


def _gate_compare(threshold: float):
    def compare(out, ref):
        """Exact where the arithmetic cannot flip a decision, tolerances elsewhere."""
        assert_close(out.entropy, ref.entropy, dtype=ref.entropy.dtype)
        assert out.entropy.dtype == ref.entropy.dtype and out.entropy.device == ref.entropy.device
        assert torch.equal(out.uncertain, out.entropy >= threshold)  # self-consistent
        clear = ((ref.entropy - threshold).abs() > 1e-3) | ref.entropy.isnan()
        assert torch.equal(out.uncertain[clear], ref.uncertain[clear])
        assert torch.equal(out.prediction, ref.prediction)  # argmax of the same values
        if ref.cluster_probs is None:
            assert out.cluster_probs is None and out.cluster is None
            return
        S = ref.cluster_probs.shape[1]
        assert out.cluster_probs.shape == ref.cluster_probs.shape
        assert_close(out.cluster_probs, ref.cluster_probs, dtype=ref.cluster_probs.dtype)
        top2 = ref.cluster_probs.topk(min(2, S), dim=-1).values
        decided = (top2[:, 0] - top2[:, -1] > 1e-3) if S > 1 else torch.ones_like(clear)
        decided = decided | ref.cluster_probs.isnan().any(-1)
        assert torch.equal(out.cluster[decided], ref.cluster[decided])

    return compare


@given(data=st.data())
def test_entropy_gate_fuzz(data):
    device = data.draw(devices())
    shape = data.draw(st.one_of(shapes(2, 2, max_size=40), shapes(1, 3)))
    x = _logits(data, shape, data.draw(ANY_DTYPE), device)
    threshold = data.draw(THRESHOLDS)
    C = x.shape[1] if x.dim() >= 2 else -1
    clusters, num, expect = data.draw(_clusters(C, device))
    expect += _logits_errors(x, "entropy_gate", 2)
    if x.dim() > 2:
        expect.append(Raises(ValueError, "entropy_gate: logits must be 2-D"))
    if x.dim() == 2 and C == 0:
        expect.append(Raises(ValueError, "entropy_gate: logits has an empty class dimension"))
    if not math.isfinite(threshold):
        expect.append(Raises(ValueError, "entropy_gate: threshold must be finite"))
    S = None
    if clusters is not None and not expect:
        S = num if num is not None else int(clusters.max()) + 1
    check_op(
        lambda: entropy_gate(x, threshold, clusters, num),
        lambda: entropy_gate_ref(x, threshold, clusters, S),
        expect,
        compare=_gate_compare(threshold),
    )


@given(data=st.data())
def test_entropy_gate_valid_fuzz(data):
    """Valid arguments only (the mixed test above compares few of its examples): routing with
    S drawn or inferred, in every layout of logits and ids, special values included."""
    device = data.draw(devices())
    n, c = data.draw(st.integers(0, 40)), data.draw(st.integers(1, 40))
    x = _logits(data, (n, c), data.draw(st.sampled_from(FLOAT_DTYPES)), device)
    threshold = data.draw(st.floats(-1.0, 10.0))
    clusters = num = S = None
    if data.draw(st.integers(0, 3)):
        S = data.draw(st.integers(1, c))
        ids = data.draw(index_tensors((c,), 0, S - 1)).to(device=device, dtype=torch.int64)
        clusters = arrange(ids, data.draw(st.sampled_from(["contiguous", "strided", "offset"])))
        num = S if data.draw(st.booleans()) else None
        S = num if num is not None else int(ids.max()) + 1
    check_op(
        lambda: entropy_gate(x, threshold, clusters, num),
        lambda: entropy_gate_ref(x, threshold, clusters, S),
        (),
        compare=_gate_compare(threshold),
    )


@given(data=st.data())
def test_entropy_gate_op_fuzz(data):
    """The registered C++ op with the Python checks bypassed: bad ids and num_clusters must be a
    RuntimeError from the kernel's own checks, never an out-of-bounds write."""
    device = data.draw(devices())
    op = registered_op("entropy_gate", device)
    if op is None:
        pytest.skip(f"no compiled entropy_gate kernel for {device}")
    N, C = data.draw(st.integers(0, 12)), data.draw(st.integers(1, 40))
    x = arrange(
        data.draw(float_tensors((N, C), data.draw(st.sampled_from(FLOAT_DTYPES)), device)),
        data.draw(layouts()),
    )
    S = data.draw(st.one_of(st.integers(-2, 6), st.sampled_from([2**31, 2**40])))
    ids = data.draw(index_tensors((C,), 0, max(S, 1) - 1, device))
    if data.draw(st.booleans()):
        ids[data.draw(st.integers(0, C - 1))] = data.draw(out_of_range_ids(max(S, 1)))
    ids = arrange(ids, data.draw(st.sampled_from(["contiguous", "strided", "offset"])))
    expect = []
    if S < 1:
        expect.append(Raises(RuntimeError, "entropy_gate: num_clusters must be >= 1"))
    elif int(ids.min()) < 0 or int(ids.max()) >= S:
        expect.append(
            Raises(RuntimeError, r"entropy_gate: clusters must hold ids in \[0, num_clusters")
        )
        # On CUDA: test_entropy_gate_cuda_op_asserts_on_bad_ids, in a child process.
        cpu_only_if(True, device)
    if S > 2**20 and not expect:
        return  # valid, but [N, S] bins of that size are not what this test is about
    check_op(
        lambda: EntropyGate(*op(x, 1.0, ids, S)[:5]),
        lambda: entropy_gate_ref(x, 1.0, ids, S),
        expect,
        compare=_gate_compare(1.0),
    )
    # Without clusters, num_clusters must be 0; the last two outputs are then empty.
    out = check_op(
        lambda: op(x, 1.0, None, S),
        None,
        []
        if S == 0
        else [Raises(RuntimeError, "entropy_gate: num_clusters given without clusters")],
    )
    if out is not None:
        _gate_compare(1.0)(EntropyGate(*out[:3], None, None), entropy_gate_ref(x, 1.0))
        assert out[3].shape == (N, 0) and out[4].shape == (0,)


def test_entropy_gate_undefined_row_empty_cluster():
    x = torch.tensor([[math.inf, 0.0], [math.nan, 1.0], [-math.inf, -math.inf], [1.0, 2.0]])
    clusters = torch.tensor([0, 0])
    out = entropy_gate(x, 1.0, clusters, num_clusters=2)
    ref = entropy_gate_ref(x, 1.0, clusters, 2)
    assert torch.equal(out.cluster_probs[:, 1], torch.zeros(4))
    assert_close(out.cluster_probs, ref.cluster_probs)
    assert torch.equal(out.cluster, ref.cluster)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_entropy_overflowing_spread_is_finite(device, dtype):
    """Found by fuzzing: finite logits whose spread overflows the dtype (z - max = -inf) have a
    well-defined entropy (here 0) and gradient (0), not 0 * -inf = NaN."""
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, -big], [big, 0.0]], dtype=dtype, device=device, requires_grad=True)
    h = softmax_entropy(x)
    assert torch.equal(h.detach(), torch.zeros(2, dtype=dtype, device=device))
    h.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    clusters = torch.tensor([0, 1], device=device)
    gate = entropy_gate(x.detach(), 1.0, clusters, num_clusters=2)
    assert torch.equal(gate.entropy, torch.zeros(2, dtype=gate.entropy.dtype, device=device))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_entropy_gate_cuda_op_asserts_on_bad_ids():
    """The CUDA kernel, Python bypassed, stops on an out-of-range id with a device-side assert
    (it never skips the id silently). The assert ends the CUDA context, so it runs apart."""
    assert_device_assert_in_child(
        "x = torch.randn(3, 4, device='cuda')\n"
        "torch.ops.labelkit.entropy_gate(x, 1.0, torch.tensor([0, 1, 5, 1], device='cuda'), 2)"
    )


# ---- max_entropy_loss ---------------------------------------------------------------------------------


def _max_entropy_loss_ref(x, reduction, eps, dim):
    bits = softmax_entropy_ref(x, dim=dim, base=2)
    loss = -torch.log((math.log2(x.shape[dim]) - bits).clamp_min(0) + eps)
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


@given(data=st.data())
def test_max_entropy_loss_valid_fuzz(data):
    """Valid arguments only: every reduction, eps and class dimension is compared."""
    device = data.draw(devices())
    shape = data.draw(shapes(min_dims=1, max_dims=3, min_last=1))
    x = _logits(data, shape, data.draw(st.sampled_from(FLOAT_DTYPES)), device)
    dim = data.draw(st.sampled_from([d for d in range(-x.dim(), x.dim()) if x.shape[d] > 0]))
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    eps = data.draw(st.sampled_from([MAX_ENTROPY_EPS, 1e-3, 1.0]))
    check_op(
        lambda: max_entropy_loss(x, reduction=reduction, eps=eps, dim=dim),
        lambda: _max_entropy_loss_ref(x, reduction, eps, dim),
    )


@given(data=st.data())
def test_max_entropy_loss_fuzz(data):
    device = data.draw(devices())
    x = _logits(data, data.draw(shapes(min_dims=0, max_dims=3)), data.draw(ANY_DTYPE), device)
    reduction = data.draw(st.sampled_from(["mean", "sum", "none", "avg"]))
    eps = data.draw(st.sampled_from([MAX_ENTROPY_EPS, 1e-3, 1.0, 0.0, -1e-6, math.inf, math.nan]))
    dim = data.draw(st.integers(-4, 3))
    expect = []
    if reduction == "avg":
        expect.append(Raises(ValueError, "max_entropy_loss: reduction must be one of"))
    if not (math.isfinite(eps) and eps > 0):
        expect.append(Raises(ValueError, "max_entropy_loss: eps must be finite and > 0"))
    expect += _logits_errors(x, "max_entropy_loss", 1) + _dim_errors(x, dim, "max_entropy_loss")
    check_op(
        lambda: max_entropy_loss(x, reduction=reduction, eps=eps, dim=dim),
        lambda: _max_entropy_loss_ref(x, reduction, eps, dim),
        expect,
    )
