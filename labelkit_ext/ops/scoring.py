"""Pool-scoring op family for active learning: ``uncertainty``, ``cosine_topk``,
``cosine_reduce``, ``kcenter_greedy`` and ``badge_select``.

None of them materialises the N x M similarity matrix (or BADGE's N x (C*D) gradient
embedding): the kernels stream over tiles and keep O(N*k) (top-k), O(N) (reductions, greedy
running minimum) state. Each public function validates its arguments (messages shared with the
C++ ``TORCH_CHECK``s), then calls ``torch.ops.labelkit.<op>`` when this build has a kernel for
the tensor's device and the pure-PyTorch reference (``labelkit_ext.reference.scoring``)
otherwise.

Policies (docs/ops/scoring.md):
- Orientation: every ``uncertainty`` score is larger for the samples to query first.
- Non-finite values: ``uncertainty`` follows the entropy family for logits (``-inf`` is a masked
  class, NaN/``+inf`` in a row gives NaN for that row); probabilities, embeddings, queries and
  keys must be finite and raise ``ValueError`` otherwise (a NaN distance has no rank). The
  finiteness checks read the data (a device sync) and are skipped under ``torch.compile``.
- Cosine similarity clamps each norm at ``eps`` as ``F.cosine_similarity`` does: a zero vector has
  similarity 0 with everything.
- Ties: ``cosine_topk`` keeps the lower key index first; the greedy selections take the lowest
  index among equal distances.
- Gradients: ``uncertainty`` is differentiable w.r.t. ``scores`` (logits or probabilities);
  similarities, top-k and the selections return indices/rankings and are not differentiable
  (inputs may require grad, e.g. model outputs; the results do not).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from labelkit_ext._ext import HAS_OPS, has_kernel
from labelkit_ext.ops._args import as_float, as_int, is_finite, reads_data
from labelkit_ext.ops._autograd import no_double_backward
from labelkit_ext.ops.types import TopK
from labelkit_ext.reference.entropy import accumulation_dtype
from labelkit_ext.reference.scoring import (
    MC_METHODS,
    UNCERTAINTY_METHODS,
    badge_select_ref,
    badge_uniforms,
    cosine_reduce_ref,
    cosine_topk_ref,
    kcenter_greedy_ref,
    uncertainty_ref,
)

__all__ = [
    "TopK",
    "uncertainty",
    "cosine_topk",
    "cosine_reduce",
    "kcenter_greedy",
    "badge_select",
    "COSINE_EPS",
    "UNCERTAINTY_METHODS",
]

#: Default norm clamp of the cosine ops, ``torch.nn.functional.cosine_similarity``'s.
COSINE_EPS = 1e-8

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("max", "min", "mean", "sum")
_METRICS = ("euclidean", "cosine")


# ---- argument checks ----------------------------------------------------------------------------


def _check_float_tensor(
    x: object, name: str, op: str, ndim: int | tuple[int, ...], shape_doc: str
) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {x.dtype}"
        )
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if x.dim() not in dims:
        raise ValueError(f"{op}: {name} must be {shape_doc}, got shape {tuple(x.shape)}")


def _check_finite(x: torch.Tensor, name: str, op: str) -> None:
    """Eager-only data check (a device sync); skipped while torch.compile traces."""
    if not reads_data(x) or x.numel() == 0:
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{op}: {name} must be finite (NaN/inf have no rank; this op rejects them rather "
            "than propagate)"
        )


def _check_int(value: object, name: str, op: str, low: int) -> int:
    number = as_int(value)
    if number is None:
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if number < low:
        raise ValueError(f"{op}: {name} must be >= {low}, got {number}")
    return number


def _check_eps(eps: object, op: str) -> float:
    value = as_float(eps)
    if value is None or not (is_finite(value) and value > 0):
        raise ValueError(f"{op}: eps must be a finite float > 0, got {eps!r}")
    return value


def _check_tile(tile_size: object, op: str) -> int:
    """0 lets the kernel choose."""
    if tile_size is None:
        return 0
    return _check_int(tile_size, "tile_size", op, 1)


def _check_pair(queries: torch.Tensor, keys: torch.Tensor, op: str) -> None:
    _check_float_tensor(queries, "queries", op, 2, "2-D [N, D]")
    _check_float_tensor(keys, "keys", op, 2, "2-D [M, D]")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"{op}: queries and keys must have the same feature size D, got queries "
            f"{tuple(queries.shape)} and keys {tuple(keys.shape)}"
        )
    if queries.shape[1] == 0:
        raise ValueError(f"{op}: queries and keys have an empty feature dimension (D == 0)")
    if queries.dtype != keys.dtype:
        raise ValueError(
            f"{op}: queries and keys must have the same dtype, got {queries.dtype} and {keys.dtype}"
        )
    if queries.device != keys.device:
        raise ValueError(
            f"{op}: queries and keys must be on the same device, got {queries.device} and {keys.device}"
        )
    _check_finite(queries, "queries", op)
    _check_finite(keys, "keys", op)


def _check_uncertainty_scores(scores: object, method: str, from_logits: bool) -> None:
    op = "uncertainty"
    if method not in UNCERTAINTY_METHODS:
        raise ValueError(
            f"uncertainty: method must be one of {UNCERTAINTY_METHODS}, got {method!r}"
        )
    if not isinstance(from_logits, bool):
        raise TypeError(
            f"uncertainty: from_logits must be a bool, got {type(from_logits).__name__}"
        )
    if method in MC_METHODS:
        _check_float_tensor(
            scores, "scores", op, 3, f"3-D Monte-Carlo samples [S, N, C] for method={method!r}"
        )
    elif method == "variation_ratio":
        _check_float_tensor(
            scores, "scores", op, (2, 3), "2-D [N, C] or 3-D Monte-Carlo samples [S, N, C]"
        )
    else:
        _check_float_tensor(
            scores,
            "scores",
            op,
            2,
            f"2-D [N, C] for method={method!r} (MC samples: use 'bald' or 'mean_std')",
        )
    if scores.shape[-1] == 0:
        raise ValueError(
            f"uncertainty: scores has an empty class dimension (C == 0), got shape {tuple(scores.shape)}"
        )
    if scores.dim() == 3 and scores.shape[0] == 0:
        raise ValueError(
            f"uncertainty: scores has no Monte-Carlo samples (S == 0), got shape {tuple(scores.shape)}"
        )
    if not from_logits:
        _check_probabilities(scores, "scores", "uncertainty", " when from_logits=False")


def _check_probabilities(p: torch.Tensor, name: str, op: str, when: str = "") -> None:
    """Every entry in [0, 1] (so finite): logits passed as probabilities fail here. Reads the
    data (a device sync), so it is skipped under torch.compile."""
    if not reads_data(p) or p.numel() == 0:
        return
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError(f"{op}: {name} must be probabilities in [0, 1] (finite){when}")


def _check_labeled(labeled: object, N: int, device: torch.device, op: str) -> torch.Tensor | None:
    """int64 indices (a tensor or sequence of ints) or a bool mask [N] -> validated int64 tensor."""
    if labeled is None:
        return None
    if isinstance(labeled, torch.Tensor):
        idx = labeled
    elif isinstance(labeled, np.ndarray) and labeled.dtype.kind in "biu":
        idx = torch.from_numpy(labeled if labeled.dtype == bool else labeled.astype(np.int64))
    elif isinstance(labeled, Sequence) and all(as_int(i) is not None for i in labeled):
        idx = torch.tensor([as_int(i) for i in labeled], dtype=torch.int64)
    else:
        raise TypeError(
            f"{op}: labeled must be an int64 tensor, a bool mask, a NumPy integer/bool array or a "
            f"sequence of ints, got {type(labeled).__name__}"
        )
    if idx.dtype == torch.bool:
        if idx.shape != (N,):
            raise ValueError(
                f"{op}: a bool labeled mask must have shape [N] = [{N}], got {tuple(idx.shape)}"
            )
        idx = idx.nonzero().flatten()
    if idx.dtype != torch.int64 or idx.dim() != 1:
        raise ValueError(
            f"{op}: labeled must be a 1-D int64 index tensor, got {idx.dtype} of shape {tuple(idx.shape)}"
        )
    idx = idx.to(device)
    if not reads_data(idx) or idx.numel() == 0:
        return idx
    lo, hi = (int(v) for v in torch.aminmax(idx))
    if lo < 0 or hi >= N:
        raise ValueError(f"{op}: labeled indices must lie in [0, N = {N}), got range [{lo}, {hi}]")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError(f"{op}: labeled indices must not repeat")
    return idx


def _check_budget(budget: object, pool: int, op: str) -> int:
    budget = _check_int(budget, "budget", op, 0)
    if budget > pool:
        raise ValueError(
            f"{op}: budget={budget} is larger than the unlabeled pool ({pool} samples)"
        )
    return budget


# ---- public functions -----------------------------------------------------------------------------


def uncertainty(
    scores: torch.Tensor, method: str = "entropy", from_logits: bool = True
) -> torch.Tensor:
    """Per-sample uncertainty in one fused pass; **larger always means query first**.

    Args:
        scores: ``[N, C]`` logits (``from_logits=True``) or probabilities, or ``[S, N, C]``
            Monte-Carlo samples (MC dropout, ensembles) for ``'bald'``, ``'mean_std'`` and the
            sampled ``'variation_ratio'``. float16, bfloat16, float32 or float64.
        method: with ``p`` the predictive distribution (softmax of the logits),
            ``'entropy'``          ``-sum p log p`` (nats);
            ``'margin'``           ``1 - (p_(1) - p_(2))``, one minus the gap of the two largest;
            ``'least_confidence'`` ``1 - max p``;
            ``'variation_ratio'``  ``1 - max p`` for ``[N, C]`` (equal to least confidence for one
            prediction), ``1 - f_mode / S`` for ``[S, N, C]`` (f_mode: votes of the modal argmax);
            ``'bald'``             ``H(mean_s p_s) - mean_s H(p_s)``, the mutual information
            between the prediction and the model weights;
            ``'mean_std'``         mean over classes of the (population) std over samples of ``p``.
        from_logits: ``scores`` are logits (softmax applied per sample) or probabilities in [0, 1].

    Returns:
        ``[N]`` float32 (float64 for float64 scores). Differentiable w.r.t. ``scores``, except the
        sampled variation ratio (a vote count). Logits follow the entropy family's policy:
        ``-inf`` masks a class, NaN/``+inf`` in a row gives NaN.
    """
    _check_uncertainty_scores(scores, method, from_logits)
    if has_kernel("uncertainty", scores.device.type):
        return torch.ops.labelkit.uncertainty(scores, method, from_logits)
    return uncertainty_ref(scores, method, from_logits)


def cosine_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    largest: bool = True,
    *,
    eps: float = COSINE_EPS,
    tile_size: int | None = None,
) -> TopK:
    """The ``k`` most (``largest=False``: least) cosine-similar keys of every query.

    Streams over key tiles with a running per-row top-k: memory O(N*k + tile), never N x M.

    Args:
        queries: ``[N, D]``; keys: ``[M, D]``; same floating dtype and device, finite.
        k: ``1 <= k <= M``.
        largest: best = most similar (True) or least similar (False).
        eps: norm clamp, ``x / max(|x|, eps)`` per vector as ``F.cosine_similarity``.
        tile_size: rows/columns per tile (None: the kernel's choice). Results do not depend on it.

    Returns:
        :class:`TopK` ``(values [N, k], indices [N, k])``, sorted best first, float32 values
        (float64 for float64 inputs); equal values keep the lower key index first. Not
        differentiable.
    """
    op = "cosine_topk"
    _check_pair(queries, keys, op)
    M = keys.shape[0]
    k = _check_int(k, "k", op, 1)
    if k > M:
        raise ValueError(f"cosine_topk: k={k} is larger than the number of keys M={M}")
    if not isinstance(largest, bool):
        raise TypeError(f"cosine_topk: largest must be a bool, got {type(largest).__name__}")
    eps = _check_eps(eps, op)
    tile = _check_tile(tile_size, op)
    if has_kernel(op, queries.device.type):
        values, indices = torch.ops.labelkit.cosine_topk(queries, keys, k, largest, eps, tile)
        return TopK(values, indices)
    with torch.no_grad():  # not differentiable on either path
        return cosine_topk_ref(queries, keys, k, largest, eps, tile or None)


def cosine_reduce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    reduce: str = "max",
    *,
    eps: float = COSINE_EPS,
    tile_size: int | None = None,
) -> torch.Tensor:
    """Reduce each query's cosine similarities over all keys without building N x M.

    ``reduce='max'`` is the similarity to the nearest labeled sample (keys = labeled set),
    ``'mean'`` the density / representativeness of a sample within the pool (keys = pool);
    ``'min'`` and ``'sum'`` are also available. Same arguments and conventions as
    :func:`cosine_topk`; ``M >= 1`` keys. Returns ``[N]`` float32 (float64 for float64 inputs),
    not differentiable.
    """
    op = "cosine_reduce"
    _check_pair(queries, keys, op)
    if reduce not in _REDUCTIONS:
        raise ValueError(f"cosine_reduce: reduce must be one of {_REDUCTIONS}, got {reduce!r}")
    if keys.shape[0] == 0:
        raise ValueError("cosine_reduce: keys is empty (M == 0): nothing to reduce over")
    eps = _check_eps(eps, op)
    tile = _check_tile(tile_size, op)
    if has_kernel(op, queries.device.type):
        return torch.ops.labelkit.cosine_reduce(queries, keys, reduce, eps, tile)
    with torch.no_grad():  # not differentiable on either path
        return cosine_reduce_ref(queries, keys, reduce, eps, tile or None)


def kcenter_greedy(
    embeddings: torch.Tensor,
    budget: int,
    labeled: torch.Tensor | Sequence[int] | None = None,
    metric: str = "euclidean",
    *,
    eps: float = COSINE_EPS,
) -> torch.Tensor:
    """Core-set k-center greedy (Sener & Savarese, ICLR 2018): pick ``budget`` samples, each the
    one farthest from everything labeled or picked so far.

    Keeps a running minimum distance per sample, O(N*D) per pick (less: the kernels skip samples
    the triangle inequality proves unaffected), never an N x N matrix.

    Args:
        embeddings: ``[N, D]`` finite floating tensor.
        budget: ``0 <= budget <= N - len(labeled)``.
        labeled: already-labeled samples: int64 indices (tensor or sequence, no repeats, in
            ``[0, N)``) or a bool mask ``[N]``. None/empty: the first pick is the sample nearest
            the mean embedding.
        metric: ``'euclidean'`` or ``'cosine'`` (``1 - cos``, ``eps`` as in :func:`cosine_topk`).

    Returns:
        ``[budget]`` int64 indices in pick order, never labeled ones. Equal distances pick the
        lowest index. Not differentiable.
    """
    op = "kcenter_greedy"
    _check_float_tensor(embeddings, "embeddings", op, 2, "2-D [N, D]")
    N = embeddings.shape[0]
    if metric not in _METRICS:
        raise ValueError(f"kcenter_greedy: metric must be one of {_METRICS}, got {metric!r}")
    eps = _check_eps(eps, op)
    idx = _check_labeled(labeled, N, embeddings.device, op)
    budget = _check_budget(budget, N - (0 if idx is None else idx.numel()), op)
    if budget > 0 and embeddings.shape[1] == 0:
        raise ValueError("kcenter_greedy: embeddings has an empty feature dimension (D == 0)")
    _check_finite(embeddings, "embeddings", op)
    if has_kernel(op, embeddings.device.type):
        return torch.ops.labelkit.kcenter_greedy(embeddings, budget, idx, metric == "cosine", eps)
    return kcenter_greedy_ref(embeddings, budget, idx, metric, eps)


def badge_select(
    probs: torch.Tensor, embeddings: torch.Tensor, budget: int, seed: int = 0
) -> torch.Tensor:
    """BADGE (Ash et al., ICLR 2020): k-means++ seeding on the last-layer gradient embeddings
    ``g_i = (p_i - onehot(argmax p_i)) (x) h_i``, without building the N x (C*D) matrix: it uses
    ``|g_i|^2 = |q_i|^2 |h_i|^2`` and ``<g_i, g_j> = <q_i, q_j> <h_i, h_j>`` with ``q = p - onehot``.

    Args:
        probs: ``[N, C]`` predicted probabilities (softmax outputs) in [0, 1].
        embeddings: ``[N, D]`` penultimate-layer features, finite, same N and dtype.
        budget: ``0 <= budget <= N``.
        seed: the draws are ``torch.rand(budget, float64)`` from a CPU generator seeded with it, so
            every device (and :mod:`labelkit_ext.distributed`) picks the same samples.

    Returns:
        ``[budget]`` int64 indices in pick order. The first is the largest gradient norm (lowest
        index on ties), as in the BADGE code; each next one is drawn with probability
        proportional to its squared distance to the nearest pick. If all remaining samples
        coincide with picks (no mass left), the lowest unpicked index is taken. Not differentiable.
    """
    op = "badge_select"
    _check_float_tensor(probs, "probs", op, 2, "2-D [N, C]")
    _check_float_tensor(embeddings, "embeddings", op, 2, "2-D [N, D]")
    N = probs.shape[0]
    if embeddings.shape[0] != N:
        raise ValueError(
            f"badge_select: probs and embeddings must have the same number of samples N, got "
            f"{tuple(probs.shape)} and {tuple(embeddings.shape)}"
        )
    if probs.device != embeddings.device:
        raise ValueError(
            f"badge_select: probs and embeddings must be on the same device, got {probs.device} "
            f"and {embeddings.device}"
        )
    budget = _check_budget(budget, N, op)
    if budget > 0 and (probs.shape[1] == 0 or embeddings.shape[1] == 0):
        raise ValueError(
            "badge_select: probs (C) and embeddings (D) must have non-empty feature dimensions"
        )
    if probs.dtype != embeddings.dtype:
        raise ValueError(
            f"badge_select: probs and embeddings must have the same dtype, got {probs.dtype} and "
            f"{embeddings.dtype}"
        )
    seed = _check_int(seed, "seed", op, 0)
    if seed >= 2**64:
        raise ValueError(
            f"badge_select: seed must be < 2**64 (torch.Generator's range), got {seed}"
        )
    _check_finite(embeddings, "embeddings", op)
    _check_probabilities(probs, "probs", op)
    if has_kernel(op, probs.device.type):
        # Through an op: a torch.Generator made inside a compiled region breaks the graph.
        uniforms = torch.ops.labelkit._badge_uniforms(
            budget, seed - 2**64 if seed >= 2**63 else seed
        )
        return torch.ops.labelkit.badge_select(probs, embeddings, uniforms, budget)
    return badge_select_ref(probs, embeddings, budget, badge_uniforms(budget, seed))


# ---- torch.library registrations (only when the compiled ops exist) ------------------------------


def _check_same_device(op: str, a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """The C++ kernels' device checks (csrc/ops/scoring_checks.h), in the fake kernels too: a
    meta or CUDA tensor beside CPU ones dispatches to that backend's kernel, not the CPU one."""
    torch._check(a.device == b.device, lambda: f"{op}: {what}")


def _define_badge_uniforms() -> None:
    """``labelkit::_badge_uniforms(budget, seed)``: ``badge_uniforms`` as an opaque op, so
    ``badge_select`` compiles with ``fullgraph=True``. The schema's int is signed: seeds from
    2**63 arrive wrapped (seed - 2**64) and are unwrapped here."""

    @torch.library.custom_op("labelkit::_badge_uniforms", mutates_args=())
    def _badge_uniforms(budget: int, seed: int) -> torch.Tensor:
        return badge_uniforms(budget, seed % 2**64)

    @_badge_uniforms.register_fake
    def _badge_uniforms_fake(budget, seed):
        return torch.empty(budget, dtype=torch.float64)


def _register_fake_kernels() -> None:
    @torch.library.register_fake("labelkit::uncertainty")
    def _uncertainty_fake(scores, method, from_logits):
        return scores.new_empty(scores.shape[-2], dtype=accumulation_dtype(scores.dtype))

    @torch.library.register_fake("labelkit::_uncertainty_backward")
    def _uncertainty_backward_fake(grad, scores, method, from_logits):
        op = "uncertainty_backward"
        _check_same_device(
            op, grad, scores, f"grad must be on the scores' device ({scores.device})"
        )
        torch._check(
            grad.dim() == 1 and grad.shape[0] == scores.shape[-2],
            lambda: f"{op}: grad must have shape [N] = [{scores.shape[-2]}] (one value per sample)",
        )
        return scores.new_empty(scores.shape)

    @torch.library.register_fake("labelkit::cosine_topk")
    def _cosine_topk_fake(queries, keys, k, largest, eps, tile_size):
        same = "queries and keys must be on the same device"
        _check_same_device("cosine_topk", queries, keys, same)
        n = queries.shape[0]
        return (
            queries.new_empty((n, k), dtype=accumulation_dtype(queries.dtype)),
            queries.new_empty((n, k), dtype=torch.int64),
        )

    @torch.library.register_fake("labelkit::cosine_reduce")
    def _cosine_reduce_fake(queries, keys, reduce, eps, tile_size):
        same = "queries and keys must be on the same device"
        _check_same_device("cosine_reduce", queries, keys, same)
        return queries.new_empty(queries.shape[0], dtype=accumulation_dtype(queries.dtype))

    @torch.library.register_fake("labelkit::kcenter_greedy")
    def _kcenter_greedy_fake(embeddings, budget, labeled, cosine, eps):
        return embeddings.new_empty(budget, dtype=torch.int64)

    @torch.library.register_fake("labelkit::badge_select")
    def _badge_select_fake(probs, embeddings, uniforms, budget):
        same = "probs and embeddings must be on the same device"
        _check_same_device("badge_select", probs, embeddings, same)
        torch._check(
            uniforms.device.type == "cpu",
            lambda: (
                f"badge_select: uniforms must be a float64 CPU tensor of shape [budget] = [{budget}]"
            ),
        )
        return probs.new_empty(budget, dtype=torch.int64)


def _uncertainty_setup(ctx, inputs, output):
    scores, method, from_logits = inputs
    if method == "variation_ratio" and scores.dim() == 3:
        # A vote count: no gradient, as from the reference (which ends in an argmax).
        ctx.mark_non_differentiable(output)
        return
    ctx.method = method
    ctx.from_logits = from_logits
    ctx.save_for_backward(scores)


def _uncertainty_backward(ctx, grad):
    (scores,) = ctx.saved_tensors
    return (
        torch.ops.labelkit._uncertainty_backward(grad, scores, ctx.method, ctx.from_logits),
        None,
        None,
    )


def _mark_non_differentiable(ctx, inputs, output):
    """Similarities stream through the kernels without a graph: inputs that require grad (model
    outputs) give results that do not, as from the reference under the wrapper's no_grad. Without
    this the kernels' inner GEMMs would see those inputs and fail."""
    ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))


def _unreachable_backward(ctx, *grads):
    raise RuntimeError("labelkit_ext: a non-differentiable cosine output reached backward")


def _register_autograd() -> None:
    torch.library.register_autograd(
        "labelkit::uncertainty", _uncertainty_backward, setup_context=_uncertainty_setup
    )
    for op in ("labelkit::cosine_topk", "labelkit::cosine_reduce"):
        torch.library.register_autograd(
            op, _unreachable_backward, setup_context=_mark_non_differentiable
        )
    torch.library.register_autograd(
        "labelkit::_uncertainty_backward",
        no_double_backward("uncertainty", "labelkit_ext.reference.scoring.uncertainty_ref"),
    )


if HAS_OPS and has_kernel("uncertainty", "cpu"):
    _define_badge_uniforms()
    _register_fake_kernels()
    _register_autograd()
