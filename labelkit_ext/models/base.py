"""The shape every model shares: a named feature extractor and a final linear layer."""

from __future__ import annotations

import torch
from torch import nn

from labelkit_ext.errors import UsageError

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """``classifier(features(x))``.

    ``features`` maps images to flat (N, feature_dim) embeddings; ``classifier`` is the final
    ``nn.Linear`` whose weight rows are the label embeddings. Methods reach both by name
    (penultimate features for active learning, label embeddings for curricula).
    """

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise UsageError(f"num_classes must be >= 1, got {num_classes}")
        self.features = features
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, num_classes)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    @property
    def label_embeddings(self) -> torch.Tensor:
        """(num_classes, feature_dim): the final layer's weight, one row per label."""
        return self.classifier.weight

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, (N, feature_dim)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
