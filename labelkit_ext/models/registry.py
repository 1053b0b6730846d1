"""Models by name, and pretrained weights read from a local file only."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from labelkit_ext.errors import MissingFileError, UsageError, reading
from labelkit_ext.models.base import Classifier
from labelkit_ext.models.resnet import resnet18
from labelkit_ext.models.small_cnn import small_cnn
from labelkit_ext.models.vgg import vgg16
from labelkit_ext.models.wide_resnet import wide_resnet

__all__ = [
    "MODELS",
    "ModelSpec",
    "available_models",
    "build_model",
    "check_model_input",
    "load_pretrained",
    "register_model",
]

# Inputs up to this size get the small-image variants (CIFAR stem, pooled VGG head).
SMALL_INPUT = 64


@dataclass(frozen=True)
class ModelSpec:
    """A named model: ``build(num_classes, in_channels, small_input, **kwargs)``, and the name
    of the final linear layer in torchvision's own state dicts (to read their weight files)."""

    name: str
    description: str
    build: Callable[..., Classifier]
    torchvision_head: str | None = None
    min_image_size: int = 1  # smaller inputs pool down to nothing (docs/models.md)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "small-cnn",
            "3-block CNN, 128-d features; seconds per epoch on CPU",
            lambda c, ch, small, **kw: small_cnn(c, ch, **kw),
            min_image_size=4,  # two 2x2 max-pools
        ),
        ModelSpec(
            "resnet18",
            "torchvision ResNet-18 (CIFAR stem for inputs <= 64px), 512-d",
            lambda c, ch, small, **kw: resnet18(c, ch, cifar_stem=small, **kw),
            "fc",
        ),
        ModelSpec(
            "wrn-28-10",
            "Wide ResNet 28-10, 640-d features",
            lambda c, ch, small, **kw: wide_resnet(c, ch, **kw),
        ),
        ModelSpec(
            "vgg16",
            "torchvision VGG16 (pooled 512-d head for inputs <= 64px)",
            lambda c, ch, small, **kw: vgg16(c, ch, small_input=small, **kw),
            "classifier.6",
            min_image_size=32,  # five 2x2 max-pools
        ),
        ModelSpec(
            "vgg16-bn",
            "torchvision VGG16 with batch norm",
            lambda c, ch, small, **kw: vgg16(c, ch, batch_norm=True, small_input=small, **kw),
            "classifier.6",
            min_image_size=32,
        ),
    )
}


def register_model(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Add your own model under ``spec.name``: every method's ``model=`` then takes it.

    ``spec.build(num_classes, in_channels, small_input, **kwargs)`` returns a ``Classifier``
    (your feature extractor, its output width, and the final linear layer the methods read);
    ``small_input`` is True for inputs of at most 64 px. A taken name is refused unless
    ``replace``. Returns ``spec``.
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    if not callable(spec.build):
        raise TypeError(f"ModelSpec {spec.name!r}: build must be callable, got {spec.build!r}")
    if spec.name in MODELS and not replace:
        raise UsageError(f"model {spec.name!r} exists already: pass replace=True to replace it")
    MODELS[spec.name] = spec
    return spec


def available_models() -> list[str]:
    """Names accepted by ``build_model`` and ``--model``."""
    return sorted(MODELS)


def check_model_input(name: str, image_size: int | None = None) -> None:
    """Refuse an unknown model ``name``, or an input size it cannot take (it would fail
    mid-training)."""
    if name not in MODELS:
        raise UsageError(f"model must be one of {available_models()}, got {name!r}")
    least = MODELS[name].min_image_size
    if image_size is not None and image_size < least:
        raise UsageError(
            f"model {name!r} needs images of at least {least} px, got image_size {image_size}: "
            "raise --image-size or choose another --model"
        )


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    pretrained: str | os.PathLike | None = None,
    **kwargs: object,
) -> Classifier:
    """Build model ``name`` for ``num_classes`` outputs on ``in_channels`` x ``image_size``
    inputs; ``pretrained`` is a local weights file (see ``load_pretrained``); ``kwargs`` go to
    the builder (e.g. ``dropout``, ``width`` for small-cnn)."""
    check_model_input(name, image_size)
    if in_channels < 1:
        raise UsageError(f"in_channels must be >= 1, got {in_channels}")
    spec = MODELS[name]
    model = spec.build(num_classes, in_channels, image_size <= SMALL_INPUT, **kwargs)
    if not isinstance(model, Classifier):
        raise TypeError(
            f"model {name!r}: build returned a {type(model).__name__}, not a Classifier (wrap "
            "your network: Classifier(features, feature_dim, num_classes), docs/models.md)"
        )
    if pretrained is not None:
        load_pretrained(model, pretrained, spec.torchvision_head)
    return model


def _state_dict(file: Path) -> dict[str, torch.Tensor]:
    with reading(file, "pretrained weights: a state dict or checkpoint saved by torch.save"):
        obj = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a labelkit checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{file} holds no state dict of tensors")
    return obj


def _to_our_keys(
    state: dict[str, torch.Tensor], torchvision_head: str | None
) -> dict[str, torch.Tensor]:
    if all(k.startswith(("features.", "classifier.")) for k in state) or torchvision_head is None:
        return state
    head = torchvision_head + "."
    return {
        (f"classifier.{k[len(head) :]}" if k.startswith(head) else f"features.{k}"): v
        for k, v in state.items()
    }


def _adapt(name: str, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """``source`` reshaped for ``target``, or None. An RGB first conv becomes a grayscale one
    by summing its input-channel weights (the response to a gray image is unchanged)."""
    if source.shape == target.shape:
        return source
    if (
        source.ndim == 4
        and source.shape[1] == 3
        and target.shape[1] == 1
        and source.shape[2:] == target.shape[2:]
    ):
        return source.sum(dim=1, keepdim=True)
    return None


def load_pretrained(
    model: Classifier, file: str | os.PathLike, torchvision_head: str | None = None
) -> dict[str, list[str]]:
    """Load weights from a local ``file`` into ``model`` (``weights_only=True``, no download).

    Accepts a labelkit checkpoint, a state dict of this model, or a torchvision state dict
    (e.g. ``resnet18-f37072fd.pth``) when ``torchvision_head`` names its final layer. Tensors
    whose shape does not fit (a new head, a CIFAR stem) keep their initialisation; a warning
    lists them. Returns {"loaded", "skipped", "missing"} key lists.
    """
    path = Path(file).expanduser()
    if path.is_dir():
        raise UsageError(f"pretrained weights: {path} is a folder; pass the weights file itself")
    if not path.is_file():
        raise MissingFileError(
            f"pretrained weights file {path} not found: weights are read only from a local file "
            "(download them beforehand, e.g. torchvision's resnet18-f37072fd.pth)"
        )
    state = _to_our_keys(_state_dict(path), torchvision_head)
    own = model.state_dict()
    fitted = {k: _adapt(k, v, own[k]) for k, v in state.items() if k in own}
    usable = {k: v for k, v in fitted.items() if v is not None}
    if not usable:
        raise UsageError(
            f"no tensor in {path} matches the model's parameters (wrong architecture?)"
        )
    model.load_state_dict(usable, strict=False)
    report = {
        "loaded": sorted(usable),
        "skipped": sorted(set(state) - set(usable)),
        "missing": sorted(set(own) - set(usable)),
    }
    if report["skipped"] or report["missing"]:
        warnings.warn(
            f"pretrained {path.name}: kept the initialisation of {report['missing']}; "
            f"ignored {report['skipped']}",
            stacklevel=2,
        )
    return report
