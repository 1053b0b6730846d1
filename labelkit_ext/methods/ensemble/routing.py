"""Entropy-gated routing: hard (the most probable cluster's sub-classifier answers) and soft
(sub-classifiers mixed by cluster probability), the validation grid over (S, e), and an
``nn.Module`` that routes batches of images."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from labelkit_ext import entropy_gate, softmax_entropy
from labelkit_ext.errors import UsageError
from labelkit_ext.methods.ensemble.clustering import check_num_clusters

__all__ = [
    "DEFAULT_QUANTILES",
    "ROUTING_MODES",
    "Routing",
    "GridPoint",
    "baseline_entropy",
    "check_quantiles",
    "check_thresholds",
    "route_nothing_threshold",
    "threshold_grid",
    "cluster_mask",
    "mask_to_clusters",
    "mix_subclassifiers",
    "hard_route",
    "soft_route",
    "route",
    "search_grid",
    "select_best",
    "LabelEmbeddingEnsemble",
]

ROUTING_MODES = ("hard", "soft")
# Quantiles of the baseline's validation entropy tried as thresholds, besides 0 and "never".
DEFAULT_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass
class Routing:
    """The ensemble's answer for N samples."""

    prediction: torch.Tensor  # (N,) int64 class
    scores: torch.Tensor  # (N, C) probabilities: the baseline's, or the routed mixture's
    uncertain: torch.Tensor  # (N,) bool: entropy >= threshold, i.e. routed
    cluster: torch.Tensor  # (N,) int64 most probable cluster


@dataclass(frozen=True)
class GridPoint:
    """Accuracy of one (S, e) on one split."""

    num_clusters: int
    threshold: float
    hard_accuracy: float
    soft_accuracy: float
    routed_share: float


def route_nothing_threshold(num_classes: int) -> float:
    """A finite threshold above every possible entropy (max ``log C``): routes no sample."""
    return math.log(num_classes) + 1.0


def check_thresholds(thresholds: Sequence[float]) -> list[float]:
    """Non-empty, finite, >= 0; returned as sorted unique floats."""
    values = [float(t) for t in thresholds]
    if not values:
        raise UsageError("thresholds must not be empty")
    bad = [t for t in values if not math.isfinite(t) or t < 0]
    if bad:
        raise UsageError(f"thresholds must be finite and >= 0, got {bad}")
    return sorted(set(values))


def check_quantiles(quantiles: Sequence[float]) -> list[float]:
    """Each quantile must lie in (0, 1) (0 and route-nothing are added by ``threshold_grid``)."""
    qs = [float(q) for q in quantiles]
    bad = [q for q in qs if not 0.0 < q < 1.0]
    if bad:
        raise UsageError(f"quantiles must lie in (0, 1), got {bad}")
    return qs


def threshold_grid(
    entropy: torch.Tensor, num_classes: int, quantiles: Sequence[float] = DEFAULT_QUANTILES
) -> list[float]:
    """Entropy thresholds e to search: 0 (route every sample), the ``quantiles`` of the
    baseline's validation ``entropy`` (route the top 1 - q share), and
    ``route_nothing_threshold`` (keep the baseline). Sorted, unique."""
    qs = check_quantiles(quantiles)
    finite = entropy[torch.isfinite(entropy)].double()
    if finite.numel() == 0:
        raise ValueError("entropy has no finite value to take quantiles of")
    levels = torch.quantile(finite, torch.tensor(qs, dtype=torch.float64)).tolist() if qs else []
    return check_thresholds([0.0, *levels, route_nothing_threshold(num_classes)])


def cluster_mask(clusters: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """``(S, C)`` bool: row k marks the classes of cluster k."""
    ids = torch.arange(num_clusters, device=clusters.device)
    return clusters.unsqueeze(0) == ids.unsqueeze(1)


def mask_to_clusters(sub_logits: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """Restrict sub-classifier k's logits ``sub_logits[k]`` (``(S, N, C)``) to the classes of
    cluster k: every other class gets -inf, so its softmax is 0 and argmax stays in cluster."""
    if sub_logits.dim() != 3 or sub_logits.shape[2] != clusters.shape[0]:
        raise ValueError(
            f"sub_logits must be (S, N, C={clusters.shape[0]}), got {tuple(sub_logits.shape)}"
        )
    own = cluster_mask(clusters.to(sub_logits.device), sub_logits.shape[0])
    return sub_logits.float().masked_fill(~own.unsqueeze(1), -math.inf)


def mix_subclassifiers(
    cluster_probs: torch.Tensor, sub_logits: torch.Tensor, clusters: torch.Tensor
) -> torch.Tensor:
    """Soft routing's ``p(y|x) = sum_k cluster_probs[k] * p_k(y|x)``, with ``p_k`` the softmax
    of sub-classifier k restricted to cluster k. ``cluster_probs`` ``(N, S)``, ``sub_logits``
    ``(S, N, C)``; returns ``(N, C)`` (rows sum to the rows of ``cluster_probs``)."""
    per_cluster = mask_to_clusters(sub_logits, clusters).softmax(dim=2)
    return torch.einsum("ns,snc->nc", cluster_probs.float(), per_cluster)


def _gate(
    base_logits: torch.Tensor, sub_logits: torch.Tensor, clusters: torch.Tensor, threshold: float
):
    num_classes = base_logits.shape[1]
    num_clusters = sub_logits.shape[0]
    check_num_clusters(num_clusters, num_classes)
    if sub_logits.shape[1:] != base_logits.shape:
        raise ValueError(
            f"sub_logits must be (S, N, C) = (S, {base_logits.shape[0]}, {num_classes}), got "
            f"{tuple(sub_logits.shape)}"
        )
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return entropy_gate(base_logits, threshold, clusters.to(base_logits.device), num_clusters)


def hard_route(
    base_logits: torch.Tensor,
    sub_logits: torch.Tensor,
    clusters: torch.Tensor,
    threshold: float,
) -> Routing:
    """Hard routing: ``entropy_gate(base_logits, threshold, clusters, S)``; a sample whose
    baseline entropy is below ``threshold`` keeps the baseline's argmax, an uncertain one takes
    the argmax of its most probable cluster's sub-classifier over that cluster's classes.

    ``base_logits`` ``(N, C)``; ``sub_logits`` ``(S, N, C)``, row k from sub-classifier k;
    ``clusters`` ``(C,)`` int64 cluster ids.
    """
    gate = _gate(base_logits, sub_logits, clusters, threshold)
    rows = torch.arange(base_logits.shape[0], device=base_logits.device)
    chosen = mask_to_clusters(sub_logits, clusters)[gate.cluster, rows]  # (N, C)
    uncertain = gate.uncertain.unsqueeze(1)
    scores = torch.where(uncertain, chosen.softmax(dim=1), base_logits.float().softmax(dim=1))
    prediction = torch.where(gate.uncertain, chosen.argmax(dim=1), gate.prediction)
    return Routing(prediction, scores, gate.uncertain, gate.cluster)


def soft_route(
    base_logits: torch.Tensor,
    sub_logits: torch.Tensor,
    clusters: torch.Tensor,
    threshold: float,
) -> Routing:
    """Soft routing: like ``hard_route``, but an uncertain sample's answer is the argmax of
    ``mix_subclassifiers(cluster_probs, sub_logits, clusters)``, every sub-classifier weighted
    by the baseline's probability of its cluster. With a one-hot ``cluster_probs`` it is hard
    routing."""
    gate = _gate(base_logits, sub_logits, clusters, threshold)
    mixed = mix_subclassifiers(gate.cluster_probs, sub_logits, clusters)
    uncertain = gate.uncertain.unsqueeze(1)
    scores = torch.where(uncertain, mixed, base_logits.float().softmax(dim=1))
    prediction = torch.where(gate.uncertain, mixed.argmax(dim=1), gate.prediction)
    return Routing(prediction, scores, gate.uncertain, gate.cluster)


def route(
    mode: str,
    base_logits: torch.Tensor,
    sub_logits: torch.Tensor,
    clusters: torch.Tensor,
    threshold: float,
) -> Routing:
    """``hard_route`` or ``soft_route`` by ``mode``."""
    if mode == "hard":
        return hard_route(base_logits, sub_logits, clusters, threshold)
    if mode == "soft":
        return soft_route(base_logits, sub_logits, clusters, threshold)
    raise ValueError(f"mode must be one of {ROUTING_MODES}, got {mode!r}")


def _accuracy(prediction: torch.Tensor, targets: torch.Tensor) -> float:
    return float((prediction.cpu() == targets.cpu()).double().mean())


def search_grid(
    base_logits: torch.Tensor,
    sub_logits: dict[int, torch.Tensor],
    clusterings: dict[int, torch.Tensor],
    targets: torch.Tensor,
    thresholds: Sequence[float],
) -> list[GridPoint]:
    """Hard and soft accuracy and the routed share for every S in ``sub_logits`` (S ->
    ``(S, N, C)``, with ``clusterings`` S -> ``(C,)`` ids) and every threshold."""
    if not sub_logits:
        raise ValueError("sub_logits must hold at least one S")
    grid = []
    for num_clusters, logits in sorted(sub_logits.items()):
        clusters = clusterings[num_clusters]
        for threshold in check_thresholds(thresholds):
            hard = hard_route(base_logits, logits, clusters, threshold)
            soft = soft_route(base_logits, logits, clusters, threshold)
            grid.append(
                GridPoint(
                    num_clusters,
                    threshold,
                    _accuracy(hard.prediction, targets),
                    _accuracy(soft.prediction, targets),
                    float(hard.uncertain.double().mean()),
                )
            )
    return grid


def select_best(grid: Iterable[GridPoint], mode: str) -> GridPoint:
    """The point with the best ``mode`` accuracy; ties go to the larger threshold (fewer samples
    routed, so "keep the baseline" wins unless routing helps), then to the smaller S."""
    if mode not in ROUTING_MODES:
        raise ValueError(f"mode must be one of {ROUTING_MODES}, got {mode!r}")
    points = list(grid)
    if not points:
        raise ValueError("grid must not be empty")
    return min(
        points, key=lambda p: (-getattr(p, f"{mode}_accuracy"), -p.threshold, p.num_clusters)
    )


class LabelEmbeddingEnsemble(nn.Module):
    """Baseline plus one sub-classifier per cluster, routed by the baseline's entropy.

    ``forward(x)`` returns a :class:`Routing`: confident samples keep the baseline's answer;
    uncertain ones are answered by their most probable cluster's sub-classifier over its classes
    (``mode="hard"``), or by all sub-classifiers weighted by cluster probability (``"soft"``).
    Sub-classifiers run only on the samples that need them. A cluster's entry in
    ``sub_models`` may be the baseline itself (a one-class cluster needs no fine-tuning).

    Inference only: the members are put in eval mode and stay there whatever ``train()`` says
    (as in a frozen backbone), so BatchNorm uses its running statistics and a sample's answer
    never depends on the rest of the batch or on which rows were routed with it.
    """

    def __init__(
        self,
        baseline: nn.Module,
        sub_models: Sequence[nn.Module],
        clusters: torch.Tensor,
        threshold: float,
        mode: str = "hard",
    ) -> None:
        super().__init__()
        num_classes = clusters.shape[0]
        check_num_clusters(len(sub_models), num_classes)
        if int(clusters.max()) + 1 != len(sub_models) or int(clusters.min()) != 0:
            raise ValueError(
                f"clusters must hold ids 0..{len(sub_models) - 1}, one per sub_model, got "
                f"{clusters.tolist()}"
            )
        check_thresholds([threshold])
        if mode not in ROUTING_MODES:
            raise ValueError(f"mode must be one of {ROUTING_MODES}, got {mode!r}")
        self.baseline = baseline
        self.sub_models = nn.ModuleList(sub_models)
        self.register_buffer("clusters", clusters.to(torch.int64).clone())
        self.threshold = float(threshold)
        self.mode = mode
        self.eval()

    def train(self, mode: bool = True) -> LabelEmbeddingEnsemble:
        self.training = mode
        for member in self.children():
            member.eval()
        return self

    @property
    def num_clusters(self) -> int:
        return len(self.sub_models)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> Routing:
        base = self.baseline(x).float()
        gate = entropy_gate(base, self.threshold, self.clusters, self.num_clusters)
        # Rows no sub-classifier is asked about keep the baseline's logits; routing ignores them.
        sub_logits = base.unsqueeze(0).repeat(self.num_clusters, 1, 1)
        for k, model in enumerate(self.sub_models):
            rows = gate.uncertain if self.mode == "soft" else gate.uncertain & (gate.cluster == k)
            if bool(rows.any()):
                sub_logits[k, rows] = model(x[rows]).float()
        return route(self.mode, base, sub_logits, self.clusters, self.threshold)

    def extra_repr(self) -> str:
        return (
            f"num_clusters={self.num_clusters}, threshold={self.threshold:.4g}, mode={self.mode!r}"
        )


def baseline_entropy(base_logits: torch.Tensor) -> torch.Tensor:
    """Softmax entropy (nats) of the baseline's logits, ``(N,)``."""
    return softmax_entropy(base_logits.float())
