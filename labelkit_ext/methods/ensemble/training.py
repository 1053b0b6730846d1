"""The ensemble's parts: the baseline (trained here, or given), and one sub-classifier per
cluster, a copy of the baseline fine-tuned on that cluster's samples."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from labelkit_ext.data import dataset_targets
from labelkit_ext.engine import (
    LAST_CHECKPOINT,
    Predictions,
    TrainConfig,
    current_dist,
    fit,
    predict,
    tensor_shape_changes,
    write_json,
)
from labelkit_ext.errors import MissingFileError, UsageError, reading
from labelkit_ext.fingerprint import module_digest
from labelkit_ext.methods.ensemble.clustering import cluster_members
from labelkit_ext.models import Classifier

__all__ = [
    "ClusterRestricted",
    "SubClassifier",
    "cluster_subset",
    "load_baseline",
    "fine_tune_subclassifiers",
    "predict_logits",
    "stack_sub_logits",
]

CLUSTER_RECORD = "cluster.json"


class ClusterRestricted(nn.Module):
    """A classifier whose logits outside ``classes`` are -inf: it keeps the architecture and
    all C outputs, but its softmax, argmax and cross-entropy live in the cluster."""

    def __init__(self, model: nn.Module, classes: Sequence[int], num_classes: int) -> None:
        super().__init__()
        keep = torch.zeros(num_classes, dtype=torch.bool)
        keep[list(classes)] = True
        self.model = model
        self.register_buffer("keep", keep)

    @property
    def num_classes(self) -> int:
        return self.keep.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).masked_fill(~self.keep, float("-inf"))


@dataclass
class SubClassifier:
    """The sub-classifier of one cluster: a ``ClusterRestricted`` copy of the baseline. A
    one-class cluster needs no training: ``model`` is then the baseline itself (routing masks
    it to that class)."""

    cluster: int
    classes: list[int]
    model: nn.Module
    fine_tuned: bool
    train_size: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    shared: bool = False  # the same classes were fine-tuned for another S: that model, shared


def cluster_subset(dataset: Dataset, classes: Sequence[int]) -> Subset:
    """The items of ``dataset`` whose class is in ``classes``, in dataset order."""
    targets = dataset_targets(dataset).to(torch.int64).reshape(-1)
    keep = torch.isin(targets, torch.as_tensor(list(classes), dtype=torch.int64))
    return Subset(dataset, keep.nonzero().flatten().tolist())


# The options behind a sub-classifier's TrainConfig, as a refused resume names them.
SUB_SETTING_NAMES = {"epochs": "sub_epochs", "lr": "sub_lr", "baseline": "baseline weights"}


def load_baseline(
    model: Classifier, file: str | os.PathLike, input_shape: Sequence[int] | None = None
) -> Classifier:
    """Load trained weights into ``model`` from a labelkit checkpoint (e.g. the
    ``checkpoint_last.pt`` of ``labelkit run supervised``) or a state dict of the same model,
    with ``weights_only=True``. Every tensor must fit: a baseline is not partially loaded. A
    labelkit checkpoint trained on inputs other than ``input_shape`` (C, H, W) is refused too:
    its weights may fit a size-agnostic network and still answer at chance."""
    path = Path(file).expanduser()
    if path.is_dir():
        raise UsageError(f"baseline {path} is a folder: pass the checkpoint file in it "
                         f"(e.g. {path / LAST_CHECKPOINT})")  # fmt: skip
    if not path.is_file():
        raise MissingFileError(f"baseline checkpoint {path} not found")
    with reading(path, "a baseline: a labelkit checkpoint or a state dict of the model"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    run = {}
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        run, state = state.get("run") or {}, state["model"]
    if not isinstance(state, dict):
        raise UsageError(f"baseline {path} holds no state dict")
    shapes = {k: list(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    wanted = {k: list(v.shape) for k, v in model.state_dict().items()}
    if shapes != wanted:
        raise UsageError(
            f"baseline {path} does not fit this run's model ({model.num_classes} classes): "
            f"{tensor_shape_changes(shapes, wanted)}"
        )
    trained_on = run.get("input_shape")
    if input_shape is not None and trained_on is not None and trained_on != list(input_shape):
        raise UsageError(
            f"baseline {path} was trained on inputs {trained_on}, this run's are "
            f"{list(input_shape)}: pass a baseline trained at this --image-size"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        raise UsageError(f"baseline {path} does not fit this run's model: {reason}") from exc
    return model


def _record_cluster(folder: Path, classes: list[int], resume: bool) -> None:
    """Refuse to resume a sub-classifier's checkpoint that was fine-tuned on other classes."""
    record = folder / CLUSTER_RECORD
    if resume and record.is_file():
        with reading(record, "the record of a sub-classifier's classes, JSON"):
            saved = json.loads(record.read_text())["classes"]
        if saved != classes:
            raise UsageError(
                f"cannot resume {folder}: it was fine-tuned on classes {saved}, the clustering "
                f"now gives {classes}; use another --out"
            )
    if current_dist().is_main:
        write_json(record, {"classes": classes})


def fine_tune_subclassifiers(
    baseline: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    clusters: torch.Tensor,
    config: TrainConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    cache: dict[tuple[int, ...], SubClassifier] | None = None,
    log: Callable[[str], None] = print,
) -> list[SubClassifier]:
    """One sub-classifier per cluster of ``clusters`` (``(C,)`` ids): a copy of ``baseline``,
    wrapped in ``ClusterRestricted``, fine-tuned with ``config`` on the cluster's training
    samples only. The cross-entropy is thus over the cluster's classes: every step goes into
    telling them apart, none into pushing down classes that routing masks anyway.

    With ``out_dir`` each trains in ``out_dir/cluster<k>`` (checkpoint, ``cluster.json``);
    ``resume`` continues those that match the cluster's classes. ``cache`` (classes ->
    sub-classifier, filled here) shares a cluster that another S already fine-tuned: with the
    same baseline, data, config and seed, training it again would give the same weights.
    """
    cache = {} if cache is None else cache
    subs = []
    # A checkpoint fine-tuned from other baseline weights (another --baseline) is refused.
    identity = {"baseline": module_digest(baseline)}
    for k, classes in enumerate(cluster_members(clusters)):
        train = cluster_subset(train_set, classes)
        if len(train) == 0:
            raise UsageError(f"cluster {k} (classes {classes}) has no training sample")
        if len(classes) == 1:  # the answer within a one-class cluster is that class
            subs.append(SubClassifier(k, classes, baseline, False, len(train)))
            continue
        known = cache.get(tuple(classes))
        if known is not None:
            log(f"cluster {k}: classes {classes} already fine-tuned, shared")
            subs.append(replace(known, cluster=k, seconds=0.0, shared=True))
            continue
        val = cluster_subset(val_set, classes) if val_set is not None else None
        folder = Path(out_dir) / f"cluster{k}" if out_dir is not None else None
        if folder is not None:
            _record_cluster(folder, classes, resume)
        log(f"cluster {k}: classes {classes}, {len(train)} training samples")
        fitted = fit(
            ClusterRestricted(copy.deepcopy(baseline), classes, len(clusters)),
            train,
            val if val is not None and len(val) else None,
            "multiclass",
            config,
            out_dir=folder,
            resume=resume,
            identity=identity,
            setting_names=SUB_SETTING_NAMES,
        )
        sub = SubClassifier(
            k, classes, fitted.model, True, len(train), fitted.history, fitted.train_seconds
        )
        cache[tuple(classes)] = sub
        subs.append(sub)
    return subs


def predict_logits(
    model: nn.Module, dataset: Dataset, device: torch.device, config: TrainConfig
) -> Predictions:
    """``engine.predict`` with the evaluation settings of ``config``."""
    return predict(
        model,
        dataset,
        device,
        batch_size=config.eval_batch_size,
        amp=config.amp,
        num_workers=config.num_workers,
    )


def stack_sub_logits(
    subs: Sequence[SubClassifier],
    baseline_logits: torch.Tensor,
    dataset: Dataset,
    device: torch.device,
    config: TrainConfig,
) -> torch.Tensor:
    """``(S, N, C)`` logits of every sub-classifier on ``dataset`` (a one-class cluster reuses
    ``baseline_logits``)."""
    rows = [
        predict_logits(sub.model, dataset, device, config).logits
        if sub.fine_tuned
        else baseline_logits
        for sub in subs
    ]
    return torch.stack(rows)
