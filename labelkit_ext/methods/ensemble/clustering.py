"""Label embeddings, their cosine similarity, and spectral clustering into groups of easily
confused classes."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from labelkit_ext.errors import UsageError
from labelkit_ext.models import Classifier

__all__ = [
    "AFFINITY",
    "label_embeddings",
    "cosine_similarity",
    "similarity_to_affinity",
    "spectral_clusters",
    "cluster_members",
    "check_num_clusters",
    "default_cluster_grid",
]

# How cosine similarity in [-1, 1] becomes the non-negative affinity spectral clustering needs.
AFFINITY = "(1 + cos) / 2"


def label_embeddings(model: Classifier) -> torch.Tensor:
    """The label embeddings of a trained classifier: a float32 CPU copy of its final linear
    layer's weight, ``(num_classes, feature_dim)``, one row per class."""
    return model.label_embeddings.detach().float().cpu().clone()


def cosine_similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity ``(C, C)`` of the rows of ``embeddings`` ``(C, D)``, in
    float64, exactly symmetric and clamped to [-1, 1] (rounding can break either)."""
    if embeddings.dim() != 2 or embeddings.shape[0] < 1:
        raise ValueError(
            f"embeddings must be (num_classes, dim) with num_classes >= 1, got shape "
            f"{tuple(embeddings.shape)}"
        )
    unit = F.normalize(embeddings.double(), dim=1)
    sim = unit @ unit.T
    return ((sim + sim.T) / 2).clamp_(-1.0, 1.0)


def similarity_to_affinity(similarity: torch.Tensor) -> np.ndarray:
    """``(1 + cos) / 2``: a symmetric affinity in [0, 1] that keeps the order of the
    similarities (clipping at 0 would make every pair of dissimilar classes alike)."""
    affinity = (1.0 + similarity.double().cpu().numpy()) / 2.0
    return (affinity + affinity.T) / 2.0  # symmetric even for a similarity from elsewhere


def check_num_clusters(
    num_clusters: int, num_classes: int | None = None, name: str = "num_clusters"
) -> None:
    """``num_clusters`` must be an int in [2, C - 1] (S = C makes every class its own cluster,
    and the ensemble the baseline); ``name`` is what the messages call it (an option name);
    without ``num_classes`` only the lower bound is checked."""
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)):
        raise UsageError(f"{name} must be an int, got {num_clusters!r}")
    if num_clusters < 2:
        raise UsageError(f"{name} must be >= 2, got {num_clusters}")
    if num_classes is not None and num_clusters >= num_classes:
        raise UsageError(
            f"{name} must be < the number of classes ({num_classes}), got {num_clusters}"
        )


def spectral_clusters(similarity: torch.Tensor, num_clusters: int, seed: int = 0) -> torch.Tensor:
    """Cluster the classes of a ``(C, C)`` cosine-similarity matrix into ``num_clusters``
    groups with scikit-learn's ``SpectralClustering(affinity="precomputed")`` on
    ``similarity_to_affinity(similarity)``.

    Returns a ``(C,)`` int64 tensor of cluster ids ``0..S-1``, numbered in the order of each
    cluster's smallest class index (so class 0 is in cluster 0), deterministic for ``seed``.
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise UsageError(f"similarity must be square (C, C), got shape {tuple(similarity.shape)}")
    num_classes = similarity.shape[0]
    check_num_clusters(num_clusters, num_classes)
    # Imported here, not at the top: `labelkit run --help` would wait for it.
    from sklearn.cluster import SpectralClustering

    labels = SpectralClustering(
        n_clusters=int(num_clusters), affinity="precomputed", random_state=seed
    ).fit_predict(similarity_to_affinity(similarity))
    # Renumber by first appearance over the classes: the ids no longer depend on k-means' order.
    _, first = np.unique(labels, return_index=True)
    order = labels[np.sort(first)]
    if len(order) != num_clusters:
        raise RuntimeError(
            f"spectral clustering returned {len(order)} non-empty clusters, {num_clusters} asked"
        )
    renumber = {int(old): new for new, old in enumerate(order)}
    return torch.tensor([renumber[int(x)] for x in labels], dtype=torch.int64)


def cluster_members(clusters: torch.Tensor, num_clusters: int | None = None) -> list[list[int]]:
    """The classes of each cluster, ``[[classes of cluster 0], ...]``, each sorted."""
    ids = clusters.tolist()
    count = num_clusters if num_clusters is not None else max(ids) + 1
    return [[c for c, k in enumerate(ids) if k == cluster] for cluster in range(count)]


def default_cluster_grid(num_classes: int) -> list[int]:
    """S values to search when none are given: about sqrt(C) times 0.6, 0.9 and 1.2, within
    [2, C - 1] (10 classes: 2, 3, 4; 100 classes: 6, 9, 12). Each S costs a full pass of
    sub-classifier fine-tuning, so the default grid stays small."""
    if num_classes < 3:
        raise UsageError(f"clustering needs at least 3 classes, got {num_classes}")
    root = np.sqrt(num_classes)
    grid = {min(max(round(root * f), 2), num_classes - 1) for f in (0.6, 0.9, 1.2)}
    return sorted(grid)
