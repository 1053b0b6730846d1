"""Softmax-entropy op family: ``softmax_entropy``, ``entropy_gate`` and ``max_entropy_loss``.

Each public function validates its arguments (messages shared with the C++ ``TORCH_CHECK``s),
then calls ``torch.ops.labelkit.<op>`` when this build has a kernel for the tensor's device and
the pure-PyTorch reference otherwise. The branch depends only on static facts (build, device),
so ``torch.compile(fullgraph=True)`` traces it.

Autocast: none of these ops is registered with autocast on purpose. They read float16/bfloat16
logits as they are (no cast copy) and always compute and return float32, which is what an
autocast "fp32" op would produce, without the extra memory traffic.
"""

from __future__ import annotations

import math

import torch

from labelkit_ext._ext import HAS_OPS, has_kernel
from labelkit_ext.ops._args import as_float, as_int, is_finite, reads_data
from labelkit_ext.ops._autograd import no_double_backward
from labelkit_ext.ops.types import EntropyGate
from labelkit_ext.reference.entropy import (
    accumulation_dtype,
    entropy_gate_ref,
    softmax_entropy_ref,
)

__all__ = ["EntropyGate", "softmax_entropy", "entropy_gate", "max_entropy_loss", "MAX_ENTROPY_EPS"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")

#: Default ``eps`` of :func:`max_entropy_loss`: keeps the loss finite (at most -log(eps) ~ 13.8)
#: when the prediction is exactly uniform.
MAX_ENTROPY_EPS = 1e-6


# ---- argument checks ----------------------------------------------------------------------------


def _check_logits(logits: object, op: str, min_dim: int) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{op}: logits must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {logits.dtype}"
        )
    if logits.dim() < min_dim:
        raise ValueError(
            f"{op}: logits must have at least {min_dim} dimension(s), got shape {tuple(logits.shape)}"
        )


def _check_dim(dim: int, ndim: int, op: str) -> int:
    value = as_int(dim)
    if value is None:
        raise TypeError(f"{op}: dim must be an int, got {type(dim).__name__}")
    dim = value
    if not -ndim <= dim < ndim:
        raise ValueError(f"{op}: dim={dim} is out of range for logits with {ndim} dimension(s)")
    return dim % ndim


def _check_classes(logits: torch.Tensor, dim: int, op: str) -> None:
    if logits.shape[dim] == 0:
        raise ValueError(
            f"{op}: logits has an empty class dimension (dim={dim} has size 0), got shape "
            f"{tuple(logits.shape)}"
        )


def _check_base(base: float | None) -> float | None:
    if base is None:
        return None
    value = as_float(base)
    if value is None:
        raise TypeError(
            f"softmax_entropy: base must be a number or None, got {type(base).__name__}"
        )
    base = value
    if not (is_finite(base) and base > 0 and base != 1):
        raise ValueError(f"softmax_entropy: base must be finite, > 0 and != 1, got {base}")
    return base


def _check_threshold(threshold: float) -> float:
    value = as_float(threshold)
    if value is None:
        raise TypeError(f"entropy_gate: threshold must be a number, got {type(threshold).__name__}")
    if not is_finite(value):
        raise ValueError(f"entropy_gate: threshold must be finite, got {value}")
    return value


def _check_clusters(clusters: object, logits: torch.Tensor) -> None:
    if not isinstance(clusters, torch.Tensor):
        raise TypeError(
            f"entropy_gate: clusters must be a torch.Tensor, got {type(clusters).__name__}"
        )
    if clusters.dtype != torch.int64:
        raise ValueError(f"entropy_gate: clusters must be int64, got {clusters.dtype}")
    C = logits.shape[1]
    if clusters.dim() != 1 or clusters.shape[0] != C:
        raise ValueError(
            f"entropy_gate: clusters must have shape [C] = [{C}], got {list(clusters.shape)}"
        )
    if clusters.device != logits.device:
        raise ValueError(
            f"entropy_gate: clusters must be on the logits' device ({logits.device}), got "
            f"{clusters.device}"
        )


def _resolve_num_clusters(clusters: torch.Tensor, num_clusters: int | None) -> int:
    """S for the output shape, and (eagerly) a check that every id lies in [0, S).

    Reading ids is a host sync; under ``torch.compile`` it is skipped and ``num_clusters`` must
    be given. The kernels check the ids themselves (a RuntimeError on CPU, a device-side assert
    on CUDA), so a bad id never writes out of bounds.
    """
    if num_clusters is not None:
        value = as_int(num_clusters)
        if value is None or value < 1:
            raise ValueError(
                f"entropy_gate: num_clusters must be an int >= 1, got {num_clusters!r}"
            )
        num_clusters = value
    C = clusters.shape[0]
    if num_clusters is not None and num_clusters > C:
        # The [N, S] cluster mass is then at least as large as the logits and partly empty.
        raise ValueError(
            f"entropy_gate: num_clusters must be <= C = {C} (one cluster id per class), got "
            f"{num_clusters}"
        )
    if not reads_data(clusters):
        if num_clusters is None:
            raise ValueError(
                "entropy_gate: pass num_clusters under torch.compile and on the meta device (it "
                "fixes the output shape; reading it from clusters needs the data)"
            )
        return num_clusters
    lo, hi = (int(v) for v in torch.aminmax(clusters))
    if lo < 0:
        raise ValueError(f"entropy_gate: clusters must hold ids >= 0, got {lo}")
    if num_clusters is None:
        if hi >= C:
            raise ValueError(
                f"entropy_gate: clusters must hold ids in [0, C = {C}) (one cluster id per class), "
                f"got {hi}"
            )
        return hi + 1
    if hi >= num_clusters:
        raise ValueError(
            f"entropy_gate: clusters must hold ids in [0, num_clusters = {num_clusters}), got {hi}"
        )
    return num_clusters


# ---- public functions -----------------------------------------------------------------------------


def softmax_entropy(logits: torch.Tensor, dim: int = -1, base: float | None = None) -> torch.Tensor:
    """Shannon entropy of ``softmax(logits)`` along ``dim``, in nats (or in ``base``, e.g. 2).

    Args:
        logits: float16, bfloat16, float32 or float64 tensor with at least one dimension.
        dim: the class dimension.
        base: logarithm base of the result; ``None`` for the natural log.

    Returns:
        ``logits.shape`` without ``dim``; float32 (float64 for float64 logits).

    ``-inf`` logits are masked classes and contribute 0. A row that is all ``-inf`` or holds
    NaN or ``+inf`` gives NaN. Differentiable w.r.t. ``logits`` (once).
    """
    _check_logits(logits, "softmax_entropy", 1)
    dim = _check_dim(dim, logits.dim(), "softmax_entropy")
    _check_classes(logits, dim, "softmax_entropy")
    base = _check_base(base)
    x = logits if dim == logits.dim() - 1 else logits.movedim(dim, -1)
    if has_kernel("softmax_entropy", x.device.type):
        entropy, _lse = torch.ops.labelkit.softmax_entropy(x)
    else:
        entropy = softmax_entropy_ref(x)
    return entropy if base is None else entropy / math.log(base)


def entropy_gate(
    logits: torch.Tensor,
    threshold: float,
    clusters: torch.Tensor | None = None,
    num_clusters: int | None = None,
) -> EntropyGate:
    """Entropy gating of ``logits [N, C]`` in one pass: the routing step of the label-embedding
    stacking ensemble.

    Args:
        logits: ``[N, C]`` float16, bfloat16, float32 or float64.
        threshold: finite float; a sample is uncertain when its entropy (nats) is ``>=`` it.
        clusters: optional ``[C]`` int64 tensor of cluster ids ``0..S-1``, one per class, on the
            logits' device.
        num_clusters: S <= C. Optional in eager mode (then ``clusters.max() + 1``); required under
            ``torch.compile``. Giving it avoids nothing else: eager calls always check the ids,
            which reads ``clusters`` (a device sync on CUDA).

    Returns:
        :class:`EntropyGate` ``(entropy, uncertain, prediction, cluster_probs, cluster)``;
        the last two are None without ``clusters``. Rows with NaN give NaN entropy (so
        ``uncertain`` is False) and NaN cluster mass; their prediction is the first NaN's index.
        ``entropy`` and ``cluster_probs`` are differentiable w.r.t. ``logits``.
    """
    _check_logits(logits, "entropy_gate", 2)
    if logits.dim() != 2:
        raise ValueError(
            f"entropy_gate: logits must be 2-D [N, C], got shape {tuple(logits.shape)}"
        )
    _check_classes(logits, 1, "entropy_gate")
    threshold = _check_threshold(threshold)
    if clusters is None:
        if num_clusters is not None:
            raise ValueError("entropy_gate: num_clusters given without clusters")
        num_clusters = 0
    else:
        _check_clusters(clusters, logits)
        num_clusters = _resolve_num_clusters(clusters, num_clusters)
    if has_kernel("entropy_gate", logits.device.type):
        out = torch.ops.labelkit.entropy_gate(logits, threshold, clusters, num_clusters)
    else:
        out = entropy_gate_ref(logits, threshold, clusters, num_clusters or None)
    entropy, uncertain, prediction, cluster_probs, cluster = out[:5]
    if clusters is None:
        return EntropyGate(entropy, uncertain, prediction, None, None)
    return EntropyGate(entropy, uncertain, prediction, cluster_probs, cluster)


def max_entropy_loss(
    logits: torch.Tensor,
    reduction: str = "mean",
    eps: float = MAX_ENTROPY_EPS,
    dim: int = -1,
) -> torch.Tensor:
    """The max-entropy loss of STN auto-augmentation: ``-log(log2(C) - H2 + eps)``.

    ``H2`` is the softmax entropy in bits along ``dim`` and ``C`` the number of classes
    (masked ``-inf`` classes included). The gap ``log2(C) - H2`` is clamped at 0 so float
    rounding near the uniform distribution cannot give NaN; the loss then peaks at ``-log(eps)``.
    It *grows* as predictions approach uniform, so an augmenter that seeks confusing inputs
    maximises it (or minimises its negation).

    Args:
        logits: floating tensor with at least one dimension.
        reduction: ``'mean'`` | ``'sum'`` | ``'none'``.
        eps: positive, finite.
        dim: the class dimension.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"max_entropy_loss: reduction must be one of {_REDUCTIONS}, got {reduction!r}"
        )
    value = as_float(eps)
    if value is None or not (is_finite(value) and value > 0):
        raise ValueError(f"max_entropy_loss: eps must be finite and > 0, got {eps!r}")
    eps = value
    _check_logits(logits, "max_entropy_loss", 1)
    dim = _check_dim(dim, logits.dim(), "max_entropy_loss")
    _check_classes(logits, dim, "max_entropy_loss")
    bits = softmax_entropy(logits, dim=dim, base=2)
    loss = -torch.log((math.log2(logits.shape[dim]) - bits).clamp_min(0) + eps)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# ---- torch.library registrations (only when the compiled ops exist) ------------------------------


def _entropy_like(logits: torch.Tensor, shape) -> torch.Tensor:
    return logits.new_empty(shape, dtype=accumulation_dtype(logits.dtype))


def _check_devices(op: str, logits: torch.Tensor, what: str, **tensors) -> None:
    """The C++ kernels' device check (csrc/ops/entropy_checks.h), in the fake kernels too: a meta
    or CUDA tensor beside CPU logits dispatches to that backend's kernel, not the CPU one."""
    for name, t in tensors.items():
        if t is not None:
            label = what or f"{name} must"
            torch._check(
                t.device == logits.device,
                lambda label=label, t=t: (
                    f"{op}: {label} be on the logits' device ({logits.device}), got {t.device}"
                ),
            )


def _register_fake_kernels() -> None:
    @torch.library.register_fake("labelkit::softmax_entropy")
    def _softmax_entropy_fake(logits):
        rows = logits.shape[:-1]
        return _entropy_like(logits, rows), _entropy_like(logits, (*rows, 2))

    @torch.library.register_fake("labelkit::_softmax_entropy_backward")
    def _softmax_entropy_backward_fake(grad, logits, entropy, lse):
        _check_devices("softmax_entropy_backward", logits, "", grad=grad, entropy=entropy, lse=lse)
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("labelkit::entropy_gate")
    def _entropy_gate_fake(logits, threshold, clusters, num_clusters):
        _check_devices("entropy_gate", logits, "", clusters=clusters)
        n = logits.shape[0]
        return (
            _entropy_like(logits, (n,)),
            logits.new_empty((n,), dtype=torch.bool),
            logits.new_empty((n,), dtype=torch.int64),
            _entropy_like(logits, (n, num_clusters)),
            logits.new_empty((n if clusters is not None else 0,), dtype=torch.int64),
            _entropy_like(logits, (n, 2)),
        )

    @torch.library.register_fake("labelkit::_entropy_gate_backward")
    def _entropy_gate_backward_fake(
        grad_entropy, grad_cluster_probs, logits, entropy, lse, clusters, cluster_probs
    ):
        op = "entropy_gate_backward"
        _check_devices(op, logits, "", grad_entropy=grad_entropy, entropy=entropy, lse=lse)
        _check_devices(
            op,
            logits,
            "every tensor must",
            clusters=clusters,
            cluster_probs=cluster_probs,
            grad_cluster_probs=grad_cluster_probs,
        )
        return logits.new_empty(logits.shape)


# The backward ops read the logits and the forward's saved per-row log-sum-exp (as a (max,
# log sum exp(z - max)) pair, exact for large logits) and entropy once and write the gradient
# once (O(N) saved besides the logits; O(N S) with clusters). They have no
# derivative themselves: a double backward raises (ops/_autograd.py).


# No materialised gradients: autograd would otherwise pass zero tensors for every output without
# one (lse, and the gate's prediction, cluster and uncertainty), alive during the backward: more
# than the gradient itself at C = 10. The backward ops take None for an absent gradient.
def _softmax_entropy_setup(ctx, inputs, output):
    (logits,) = inputs
    entropy, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, entropy, lse)


def _softmax_entropy_backward(ctx, grad, _grad_lse):
    if grad is None:
        return None
    logits, entropy, lse = ctx.saved_tensors
    return torch.ops.labelkit._softmax_entropy_backward(grad, logits, entropy, lse)


def _entropy_gate_setup(ctx, inputs, output):
    logits, _threshold, clusters, num_clusters = inputs
    entropy, uncertain, prediction, cluster_probs, cluster, lse = output
    ctx.mark_non_differentiable(uncertain, prediction, cluster, lse)
    ctx.set_materialize_grads(False)
    ctx.routed = clusters is not None and num_clusters > 0
    ctx.save_for_backward(logits, entropy, lse, clusters if ctx.routed else None, cluster_probs)


def _entropy_gate_backward(ctx, g_entropy, _g_unc, _g_pred, g_cluster_probs, _g_cluster, _g_lse):
    logits, entropy, lse, clusters, cluster_probs = ctx.saved_tensors
    if not ctx.routed:
        g_cluster_probs = None
    if g_entropy is None and g_cluster_probs is None:
        return None, None, None, None
    grad = torch.ops.labelkit._entropy_gate_backward(
        g_entropy, g_cluster_probs, logits, entropy, lse, clusters, cluster_probs
    )
    return grad, None, None, None


def _register_autograd() -> None:
    torch.library.register_autograd(
        "labelkit::softmax_entropy", _softmax_entropy_backward, setup_context=_softmax_entropy_setup
    )
    torch.library.register_autograd(
        "labelkit::entropy_gate", _entropy_gate_backward, setup_context=_entropy_gate_setup
    )
    once = no_double_backward("the entropy ops", "labelkit_ext.reference.entropy")
    for backward in ("_softmax_entropy_backward", "_entropy_gate_backward"):
        torch.library.register_autograd(f"labelkit::{backward}", once)


if HAS_OPS:
    _register_fake_kernels()
    _register_autograd()
