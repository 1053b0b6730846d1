"""The networks of the pretext method: a backbone from the model registry, the shared-backbone
pretext network (one image, a siamese pair or nine jigsaw tiles), and the frozen backbone with a
two-dense-layer head used for linear evaluation."""

from __future__ import annotations

import copy

import torch
from torch import nn

from labelkit_ext.models import Classifier, build_model

__all__ = [
    "Backbone",
    "FrozenBackbone",
    "PretextNet",
    "LinearEvalModel",
    "build_backbone",
    "eval_head",
    "feature_dim",
    "mlp",
]


class Backbone(nn.Module):
    """A registry model's ``features`` (images -> flat ``(N, feature_dim)``) on its own."""

    def __init__(self, features: nn.Module, feature_dim: int, model: str) -> None:
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def feature_dim(backbone: nn.Module) -> int:
    """The width D of ``backbone``'s flat ``(N, D)`` output, which it must state: a
    ``Backbone`` (``build_backbone``, for a registered model too) or any module with an int
    ``feature_dim`` attribute."""
    dim = getattr(backbone, "feature_dim", None)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise TypeError(
            f"backbone must state its output width as an int feature_dim >= 1 (a {type(backbone).__name__}"
            f" has {dim!r}): use build_backbone(model, ...) (models.register_model adds yours), "
            "or set backbone.feature_dim = D for a module mapping images to (N, D)"
        )
    return dim


def build_backbone(
    model: str, in_channels: int, image_size: int, pretrained: str | None = None
) -> Backbone:
    """The feature extractor of registry model ``model`` (its classifier is dropped).

    ``image_size`` picks the small-input variant (CIFAR stem, pooled VGG head) for inputs up to
    64 px, as ``build_model`` does; pass the size of what the backbone sees in pretext training
    *and* evaluation (the full image: tiles are smaller, which global pooling absorbs).
    """
    net = build_model(model, 1, in_channels, image_size, pretrained)
    return Backbone(net.features, net.feature_dim, model)


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Two dense layers, ``in -> hidden -> ReLU -> out``."""
    if min(in_dim, hidden, out_dim) < 1:
        raise ValueError(f"layer sizes must be >= 1, got {in_dim}, {hidden}, {out_dim}")
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


class PretextNet(nn.Module):
    """A shared backbone applied to ``num_inputs`` images per sample, their features
    concatenated in order, and a two-dense-layer head.

    Input ``(N, C, H, W)`` when ``num_inputs == 1`` (rotation, contrastive projection), else
    ``(N, num_inputs, C, h, w)``: the context pair (center, neighbour; siamese) or the jigsaw
    tiles in slot order. Every input goes through the backbone in one batch of ``N * K``.
    """

    def __init__(
        self, backbone: Backbone, num_inputs: int, num_outputs: int, hidden: int = 256
    ) -> None:
        super().__init__()
        if num_inputs < 1:
            raise ValueError(f"num_inputs must be >= 1, got {num_inputs}")
        self.backbone = backbone
        self.num_inputs = num_inputs
        self.width = num_inputs * feature_dim(backbone)  # the head's input
        self.head = mlp(self.width, hidden, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_inputs == 1:
            return self.head(self.backbone(x))
        if x.ndim != 5 or x.shape[1] != self.num_inputs:
            raise ValueError(
                f"expected (N, {self.num_inputs}, C, h, w) inputs, got shape {tuple(x.shape)}"
            )
        n = x.shape[0]
        features = self.backbone(x.flatten(0, 1))  # (N * K, D), sample-major
        return self.head(features.reshape(n, self.width))  # (N, K * D), slot-major per sample


class FrozenBackbone(nn.Module):
    """A frozen copy of a backbone: no gradients, and always in eval mode, so neither its
    weights nor its BatchNorm running statistics move while a head trains on top of it
    (``module.train()`` from the engine's loop leaves it in eval). A copy, so the caller's
    backbone keeps its own ``requires_grad`` flags and mode and can still be fine-tuned."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenBackbone:
        self.training = mode
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(x)


def eval_head(feature_dim: int, num_classes: int, hidden: int = 256) -> Classifier:
    """Linear evaluation's head: BatchNorm without affine parameters (puts every pretext's
    features on one scale) -> dense -> ReLU -> dense. A ``Classifier`` whose ``classifier`` is
    the second dense layer; it trains on features alone (``extract_features``) or inside
    ``LinearEvalModel``."""
    layers = nn.Sequential(
        nn.BatchNorm1d(feature_dim, affine=False),
        nn.Linear(feature_dim, hidden),
        nn.ReLU(inplace=True),
    )
    return Classifier(layers, hidden, num_classes)


class LinearEvalModel(nn.Module):
    """``head(frozen backbone(x))``: images in, class logits out. Only the head trains."""

    def __init__(self, backbone: nn.Module, head: Classifier) -> None:
        super().__init__()
        self.backbone = FrozenBackbone(backbone)
        self.head = head

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
