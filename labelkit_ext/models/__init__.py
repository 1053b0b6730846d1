"""Models that expose ``features`` (the feature extractor) and ``classifier`` (the final
linear layer, whose weight holds the label embeddings). ``build_model(name, ...)`` builds one."""

from labelkit_ext.models.base import Classifier
from labelkit_ext.models.registry import (
    MODELS,
    ModelSpec,
    available_models,
    build_model,
    check_model_input,
    load_pretrained,
    register_model,
)
from labelkit_ext.models.resnet import resnet18
from labelkit_ext.models.small_cnn import small_cnn
from labelkit_ext.models.vgg import vgg16
from labelkit_ext.models.wide_resnet import wide_resnet

__all__ = [
    "MODELS",
    "Classifier",
    "ModelSpec",
    "available_models",
    "build_model",
    "check_model_input",
    "load_pretrained",
    "register_model",
    "resnet18",
    "small_cnn",
    "vgg16",
    "wide_resnet",
]
