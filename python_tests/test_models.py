"""Every model's forward on 1 and 3 channels, its named parts, and local pretrained weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from labelkit_ext.models import (
    Classifier,
    available_models,
    build_model,
    load_pretrained,
    wide_resnet,
)

FEATURE_DIMS = {"small-cnn": 128, "resnet18": 512, "wrn-28-10": 640, "vgg16": 512, "vgg16-bn": 512}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(FEATURE_DIMS))
def test_forward_and_named_parts(name, channels):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=channels, image_size=32).eval()
    x = torch.randn(2, channels, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features = model.features(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert isinstance(model, Classifier) and isinstance(model.classifier, nn.Linear)
    assert features.shape == (2, FEATURE_DIMS[name]) == (2, model.feature_dim)
    assert model.label_embeddings.shape == (7, FEATURE_DIMS[name])
    assert torch.allclose(model.classifier(features), logits, atol=1e-5)
    assert torch.equal(model.embed(x), features)


def test_registry_lists_every_model():
    assert available_models() == sorted(FEATURE_DIMS)
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("resnet50", 10)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("small-cnn", 10, in_channels=0)


def test_resnet18_stem_follows_the_image_size():
    small = build_model("resnet18", 10, 1, image_size=28)
    large = build_model("resnet18", 10, 1, image_size=224)
    assert small.features.conv1.kernel_size == (3, 3) and isinstance(
        small.features.maxpool, nn.Identity
    )
    assert large.features.conv1.kernel_size == (7, 7) and large.features.conv1.in_channels == 1
    assert small(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_vgg16_full_head_for_large_inputs():
    model = build_model("vgg16", 5, 1, image_size=224)
    assert model.feature_dim == 4096 and model.features.classifier[6].__class__ is nn.Identity


def test_small_cnn_and_wrn_options_are_checked():
    assert build_model("small-cnn", 3, 1, image_size=8)(torch.randn(4, 1, 8, 8)).shape == (4, 3)
    assert wide_resnet(10, 3, depth=10, widen=1).feature_dim == 64
    with pytest.raises(ValueError, match="depth"):
        wide_resnet(10, depth=27)
    with pytest.raises(ValueError, match="dropout"):
        build_model("small-cnn", 3, dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small-cnn", 0)


def test_pretrained_torchvision_weights_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    reference = tv_resnet18(weights=None)
    file = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), file)
    with pytest.warns(UserWarning, match="classifier.weight"):
        model = build_model("resnet18", 4, in_channels=1, image_size=224, pretrained=file)
    feats = model.features
    assert torch.equal(feats.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(feats.bn1.running_var, reference.bn1.running_var)
    # RGB filters summed into one gray channel: the same response to a gray image.
    assert torch.allclose(feats.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    gray = torch.rand(1, 1, 64, 64)
    assert torch.allclose(feats.conv1(gray), reference.conv1(gray.expand(1, 3, 64, 64)), atol=1e-5)
    # Same class count: the head is loaded as well, and nothing is reported missing.
    same = build_model("resnet18", 1000, image_size=224)
    report = load_pretrained(same, file, "fc")
    assert report["missing"] == [] and torch.equal(same.classifier.weight, reference.fc.weight)


def test_pretrained_roundtrip_of_our_own_state_dict(tmp_path):
    source = build_model("small-cnn", 10, 1)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    target = build_model("small-cnn", 10, 1, pretrained=tmp_path / "w.pt")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_pretrained_only_from_an_existing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="only from a local file"):
        build_model("resnet18", 10, pretrained=tmp_path / "absent.pth")
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="matches the model"):
        build_model("small-cnn", 10, pretrained=tmp_path / "other.pt")
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder; pass the weights file itself"):
        build_model("small-cnn", 10, pretrained=tmp_path)
