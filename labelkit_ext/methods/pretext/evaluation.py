"""Linear evaluation of a frozen backbone (two dense layers trained on labels), label-fraction
subsets, and the supervised-from-scratch baseline it is compared with."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from labelkit_ext.data import DataSplits, dataset_targets
from labelkit_ext.engine import (
    Predictions,
    TrainConfig,
    data_fingerprint,
    fit,
    predict,
    prediction_metrics,
    seed_everything,
    select_device,
)
from labelkit_ext.fingerprint import module_digest, tensor_digest
from labelkit_ext.methods.pretext.networks import (
    Backbone,
    LinearEvalModel,
    eval_head,
    feature_dim,
)
from labelkit_ext.models import build_model

__all__ = [
    "EVAL_SPLITS",
    "EvalResult",
    "balanced_loss",
    "epochs_for",
    "extract_features",
    "label_fraction_indices",
    "linear_eval",
    "train_scratch",
]

# Where a trained head or network is scored; train features are what the head learns from.
EVAL_SPLITS = ("val", "test")
# With a checkpoint folder, a head or scratch network is saved at most this often (and after
# its last epoch): a 1 % label subset trains hundreds of one-batch epochs.
CHECKPOINT_SECONDS = 30.0


@dataclass
class EvalResult:
    """One trained classifier on one label subset: its metrics per split, its training history
    and the model itself (``LinearEvalModel``, or the scratch network)."""

    model: nn.Module
    metrics: dict[str, dict]
    history: list[dict] = field(default_factory=list)
    train_size: int = 0
    epochs: int = 0
    seconds: float = 0.0
    resumed_from: int = 0


def label_fraction_indices(targets: torch.Tensor, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a ``fraction`` of the samples, drawn with ``seed``.

    Class-index targets are sampled per class (``round(fraction * n_c)``, at least one each),
    so even 1 % of a 9:1 set keeps both classes; multi-hot targets are sampled at random.
    ``fraction == 1`` is every index.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    n = len(targets)
    if fraction == 1.0:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if targets.ndim != 1:
        return np.sort(rng.choice(n, size=max(1, round(fraction * n)), replace=False))
    labels = targets.numpy()
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, round(fraction * len(members)))
        picked.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picked))


def epochs_for(epochs: int, train_size: int, batch_size: int, min_steps: int) -> int:
    """``epochs``, raised so that training takes at least ``min_steps`` optimiser steps: a
    1 % label subset fits in one batch, and a fixed epoch count would then barely train."""
    steps_per_epoch = math.ceil(train_size / batch_size)
    return max(epochs, math.ceil(min_steps / max(steps_per_epoch, 1)))


def balanced_loss(targets: torch.Tensor, task: str, device: torch.device) -> nn.Module:
    """The task's loss with class weights ``n / (C * n_c)`` (multi-class) or per-label
    ``pos_weight = negatives / positives`` (multi-label): each class counts equally, however
    skewed the labeled subset is (the shared PneumoniaMNIST train split is 9:1)."""
    if task == "multiclass":
        counts = torch.bincount(targets.long()).double()
        weight = len(targets) / (len(counts) * counts.clamp_min(1))
        return nn.CrossEntropyLoss(weight=weight.float().to(device))
    positives = targets.double().sum(0)
    pos_weight = (len(targets) - positives) / positives.clamp_min(1)
    return nn.BCEWithLogitsLoss(pos_weight=pos_weight.float().to(device))


def extract_features(
    backbone: nn.Module, splits: DataSplits, config: TrainConfig
) -> dict[str, Predictions]:
    """The backbone's features (as ``Predictions.logits``) and targets for ``train``
    (un-augmented images), ``val`` and ``test``, computed once in eval mode.

    A frozen backbone in eval mode is a fixed function, so training the head on these is the
    same computation as training ``LinearEvalModel`` on the images (tested), minus the
    repeated forward passes.
    """
    device = select_device(config.device)
    was_training = backbone.training
    backbone.to(device).eval()
    datasets = {"train": splits.train_eval, "val": splits.val, "test": splits.test}
    features = {
        name: predict(
            backbone,
            dataset,
            device,
            batch_size=config.eval_batch_size,
            amp=config.amp,
            num_workers=config.num_workers,
        )
        for name, dataset in datasets.items()
    }
    backbone.train(was_training)
    return features


def _score(
    model: nn.Module, datasets: dict[str, Dataset], splits: DataSplits, config: TrainConfig
) -> dict[str, dict]:
    device = next(model.parameters()).device
    info = splits.info
    return {
        name: prediction_metrics(
            predict(model, dataset, device, batch_size=config.eval_batch_size, amp=config.amp),
            info.task,
            info.class_names,
        )
        for name, dataset in datasets.items()
    }


def _subset(dataset: Dataset, labeled: np.ndarray | None) -> Dataset:
    return dataset if labeled is None else Subset(dataset, labeled.tolist())


def _checkpointing(
    out_dir: str | os.PathLike | None, resume: bool, identity: dict | None, **setting_names: str
) -> dict:
    """``fit``'s checkpoint arguments: ``out_dir`` keeps the run (``resume`` continues or
    reuses it), refused when ``identity`` differs (named by ``setting_names``)."""
    return {"out_dir": out_dir, "resume": resume, "checkpoint_seconds": CHECKPOINT_SECONDS,
            "identity": identity, "setting_names": setting_names}  # fmt: skip


def linear_eval(
    backbone: Backbone,
    splits: DataSplits,
    config: TrainConfig,
    *,
    labeled: np.ndarray | None = None,
    hidden: int = 256,
    balanced: bool = True,
    min_steps: int = 0,
    features: dict[str, Predictions] | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> EvalResult:
    """Train the two-dense-layer head on the frozen ``backbone`` for ``config.epochs`` epochs
    (raised to ``min_steps`` steps, see ``epochs_for``) on the labeled training images
    ``labeled`` (indices into ``splits.train_eval``; default all), then score val and test.

    ``features`` (from ``extract_features``) trains the head on precomputed features; without
    it the head trains inside ``LinearEvalModel`` on the images themselves. The backbone's
    weights and BatchNorm statistics are unchanged either way. ``config.seed`` fixes the head's
    initialisation and the data order.

    With ``out_dir`` the head is checkpointed (``engine.fit``); ``resume`` continues it, or
    reuses a finished one, unless it was trained on another backbone, label subset or loss.
    """
    tic = time.perf_counter()
    info = splits.info
    targets = dataset_targets(splits.train_eval)
    index = labeled if labeled is not None else np.arange(len(targets))
    config = replace(
        config, epochs=epochs_for(config.epochs, len(index), config.batch_size, min_steps)
    )
    device = select_device(config.device)
    seed_everything(config.seed)
    head = eval_head(feature_dim(backbone), info.num_classes, hidden)
    model = LinearEvalModel(backbone, head)
    loss = balanced_loss(targets[index], info.task, device) if balanced else None
    # Precomputed features carry no data fingerprint: what they were computed by and from
    # (hashed only when there is a checkpoint to compare it with).
    identity = (
        {
            "backbone": module_digest(backbone),
            "images": data_fingerprint(splits.train_eval),
            "labeled": tensor_digest(torch.as_tensor(index)),
            "balanced": balanced,
        }
        if out_dir
        else None
    )
    saving = _checkpointing(out_dir, resume, identity, backbone="backbone weights",
                            epochs="eval_epochs (or min_steps)", lr="eval_lr")  # fmt: skip
    if features is not None:
        train_x = features["train"].logits[index]
        train_set = TensorDataset(train_x, features["train"].targets[index])
        fitted = fit(head, train_set, None, info.task, config, loss_fn=loss, **saving)
        eval_sets = {s: TensorDataset(features[s].logits, features[s].targets) for s in EVAL_SPLITS}
        metrics = _score(head, eval_sets, splits, config)
        model.to(device)
    else:
        train_set = _subset(splits.train_eval, index)
        fitted = fit(model, train_set, None, info.task, config, loss_fn=loss, **saving)
        metrics = _score(model, {s: getattr(splits, s) for s in EVAL_SPLITS}, splits, config)
    return EvalResult(
        model.eval(), metrics, fitted.history, len(index), config.epochs,
        time.perf_counter() - tic, fitted.resumed_from,
    )  # fmt: skip


def train_scratch(
    splits: DataSplits,
    model: str,
    config: TrainConfig,
    *,
    labeled: np.ndarray | None = None,
    balanced: bool = True,
    min_steps: int = 0,
    pretrained: str | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> EvalResult:
    """The supervised-from-scratch baseline: the whole network ``model`` trained on the labeled
    (augmented) training images, with the same loss, label subset and epoch rule as
    ``linear_eval``, then scored on val and test. ``out_dir`` and ``resume`` as there."""
    tic = time.perf_counter()
    info = splits.info
    targets = dataset_targets(splits.train)
    index = labeled if labeled is not None else np.arange(len(targets))
    config = replace(
        config, epochs=epochs_for(config.epochs, len(index), config.batch_size, min_steps)
    )
    device = select_device(config.device)
    seed_everything(config.seed)
    net = build_model(model, info.num_classes, info.in_channels, info.image_size, pretrained)
    loss = balanced_loss(targets[index], info.task, device) if balanced else None
    saving = _checkpointing(out_dir, resume, {"balanced": balanced, "pretrained": pretrained},
                            epochs="epochs (or min_steps)")  # fmt: skip
    fitted = fit(net, _subset(splits.train, index), None, info.task, config, loss_fn=loss,
                 **saving)  # fmt: skip
    metrics = _score(fitted.model, {s: getattr(splits, s) for s in EVAL_SPLITS}, splits, config)
    return EvalResult(
        fitted.model.eval(), metrics, fitted.history, len(index), config.epochs,
        time.perf_counter() - tic, fitted.resumed_from,
    )  # fmt: skip
