"""Staged training: each stage is an ``engine.fit`` on its task's stream, starting from the
previous stage's network with a new head; after every chunk the target's validation mean AUC
is measured through the current head."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from labelkit_ext.data import DatasetInfo, DataSplits, dataset_targets
from labelkit_ext.engine import (
    EpochEnd,
    Predictions,
    TrainConfig,
    classification_metrics,
    current_dist,
    derive_seed,
    fit,
    predict,
    prediction_metrics,
    seed_everything,
    select_device,
    write_json,
)
from labelkit_ext.errors import UsageError, reading
from labelkit_ext.methods.curriculum.schedule import StageStream
from labelkit_ext.methods.curriculum.tasks import LabelTask, build_task, findings_matrix
from labelkit_ext.models import Classifier, build_model

__all__ = [
    "FindingData",
    "ScheduleRun",
    "check_multilabel",
    "finding_data",
    "replace_head",
    "target_auc",
    "train_schedule",
]

CURVE_FILE = "curve.json"


@dataclass
class FindingData:
    """The datasets (yielding images) and the finding matrix of each split."""

    train: Dataset
    val: Dataset
    test: Dataset
    findings: dict[str, torch.Tensor]  # "train" / "val" / "test" -> (N, K) float32 0/1
    names: tuple[str, ...]
    name: str
    in_channels: int
    image_size: int

    @property
    def num_findings(self) -> int:
        return len(self.names)


# A stage's fit counts validation chunks as epochs and a chunk's samples as its training set:
# a refused resume names them by the options they come from.
STAGE_SETTING_NAMES = {
    "epochs": "validation chunks of the stage (from --epochs, --evals-per-epoch, --aux-share)",
    "train_samples": "samples per chunk (from --evals-per-epoch, --batch-size)",
}


def check_multilabel(info: DatasetInfo) -> None:
    """The curriculum's tasks come from a multi-hot label matrix: refuse other data sets."""
    if info.task != "multilabel":
        raise UsageError(
            f"the curriculum needs a multi-label data set (e.g. digit-mosaic, nih-chestxray14, "
            f"chestmnist); {info.name} is {info.task}"
        )


def finding_data(splits: DataSplits, no_finding: int | str | None = None) -> FindingData:
    """``FindingData`` of a multi-label data set (see ``findings_matrix`` for ``no_finding``)."""
    info = splits.info
    check_multilabel(info)
    findings, names = {}, ()
    for split in ("train", "val", "test"):
        findings[split], names = findings_matrix(
            dataset_targets(getattr(splits, split)), info.class_names, no_finding
        )
    return FindingData(
        splits.train, splits.val, splits.test, findings, names, info.name,
        info.in_channels, info.image_size,
    )  # fmt: skip


def replace_head(model: Classifier, num_outputs: int, seed: int) -> Classifier:
    """A copy of ``model`` that keeps every backbone weight (``features``) and gets a freshly
    initialised ``nn.Linear`` head with ``num_outputs`` outputs (seeded by ``seed``)."""
    new = copy.deepcopy(model)
    seed_everything(seed)
    old = new.classifier
    new.classifier = nn.Linear(new.feature_dim, num_outputs).to(
        device=old.weight.device, dtype=old.weight.dtype
    )
    return new


def target_auc(task: LabelTask, logits: torch.Tensor, findings: torch.Tensor) -> dict:
    """Per-finding and mean ROC AUC of the target, scored through ``task``'s head."""
    metrics = classification_metrics(task.finding_scores(logits), findings, "multilabel")
    return {"auc": metrics["auc"], "per_class_auc": list(metrics["per_class_auc"].values())}


@dataclass
class ScheduleRun:
    """One schedule trained with one seed: the final (multi-label) model and its curve."""

    schedule: str
    stages: tuple[str, ...]
    steps: list[int]
    model: Classifier
    device: torch.device
    curve: list[dict] = field(default_factory=list)
    tasks: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0


class _StageMonitor:
    """After each chunk: the target's val mean AUC through the current head, and the stage
    task's own val loss / AUC on its val images, from one prediction over val. The records
    are also written to ``folder/curve.json`` so a resumed stage keeps its earlier points."""

    def __init__(self, data: FindingData, task: LabelTask, val_task: LabelTask | None,
                 stage: int, first_step: int, eval_every: int, config: TrainConfig,
                 device: torch.device, folder: Path | None, resume: bool) -> None:  # fmt: skip
        self.data, self.task, self.val_task = data, task, val_task
        self.stage, self.first_step, self.eval_every = stage, first_step, eval_every
        self.config, self.device, self.folder = config, device, folder
        self.records: list[dict] = []
        if resume and folder is not None and (folder / CURVE_FILE).is_file():
            with reading(folder / CURVE_FILE, "a resumed stage's validation curve, JSON"):
                self.records = json.loads((folder / CURVE_FILE).read_text())

    def __call__(self, end: EpochEnd) -> None:
        pred = predict(
            end.model, self.data.val, self.device, batch_size=self.config.eval_batch_size,
            amp=self.config.amp, num_workers=self.config.num_workers,
        )  # fmt: skip
        record = {
            "stage": self.stage,
            "task": self.task.kind,
            "stage_epoch": end.epoch,
            "step": self.first_step + end.epoch * self.eval_every,
            "lr": end.record["lr"],
            "train_loss": end.record["train_loss"],
            "val_target_auc": target_auc(self.task, pred.logits, self.data.findings["val"])["auc"],
        }
        if self.val_task is not None:
            rows = self.val_task.rows
            own = prediction_metrics(
                Predictions(pred.logits[rows], self.val_task.targets), self.task.engine_task
            )
            record.update({"val_stage_loss": own["loss"], "val_stage_auc": own["auc"]})
        self.records = [r for r in self.records if r["stage_epoch"] < end.epoch] + [record]
        if self.folder is not None and current_dist().is_main:
            write_json(self.folder / CURVE_FILE, self.records)


def _val_task(kind: str, data: FindingData, groups: torch.Tensor | None) -> LabelTask | None:
    try:
        return build_task(kind, data.findings["val"], data.names, groups)
    except ValueError:  # e.g. no val image with exactly one finding: no stage metrics
        return None


def train_schedule(
    data: FindingData,
    stages: Sequence[str],
    steps: Sequence[int],
    config: TrainConfig,
    *,
    model: str = "small-cnn",
    eval_every: int,
    groups: torch.Tensor | None = None,
    pretrained: str | os.PathLike | None = None,
    model_kwargs: dict | None = None,
    schedule: str = "",
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> ScheduleRun:
    """Train ``stages`` (coarse to fine, the last ``multilabel``) for ``steps`` optimisation
    steps each (multiples of ``eval_every``), seeded by ``config.seed``.

    Stage 0 builds ``model`` (seeded, so every schedule of a seed starts from the same
    backbone); each later stage starts from the previous one's network with a new head
    (``replace_head``) and a fresh optimiser and LR schedule (``config``; its ``epochs`` is
    replaced by the stage's chunks). With ``out_dir``, stage i checkpoints into
    ``out_dir/stage<i>-<task>/`` and ``resume`` continues from there.
    """
    if len(stages) != len(steps):
        raise ValueError(f"{len(stages)} stages but {len(steps)} step counts")
    if any(s < eval_every or s % eval_every for s in steps):
        raise ValueError(
            f"every stage's steps must be a positive multiple of {eval_every}: {steps}"
        )
    world = current_dist().world_size
    device = select_device(config.device, current_dist().local_rank)
    net: Classifier | None = None
    curve: list[dict] = []
    tasks: list[dict] = []
    first_step = 0
    tic = time.perf_counter()
    for i, (kind, stage_steps) in enumerate(zip(stages, steps, strict=True)):
        task = build_task(kind, data.findings["train"], data.names, groups)
        stage_seed = derive_seed(config.seed, i)
        if net is None:
            seed_everything(config.seed)
            net = build_model(
                model, task.num_outputs, data.in_channels, data.image_size, pretrained,
                **(model_kwargs or {}),
            )  # fmt: skip
        else:
            net = replace_head(net, task.num_outputs, derive_seed(stage_seed, 1))
        stream = StageStream(
            data.train, task.rows, task.targets, eval_every * config.batch_size * world, stage_seed
        )
        folder = Path(out_dir) / f"stage{i}-{kind}" if out_dir is not None else None
        stage_config = replace(config, epochs=stage_steps // eval_every, seed=stage_seed)
        monitor = _StageMonitor(
            data, task, _val_task(kind, data, groups), i, first_step, eval_every, stage_config,
            device, folder, resume,
        )  # fmt: skip
        fitted = fit(
            net, stream, None, task.engine_task, stage_config, out_dir=folder, resume=resume,
            class_names=task.class_names, callbacks=[monitor], setting_names=STAGE_SETTING_NAMES,
        )  # fmt: skip
        net = fitted.model
        curve += monitor.records
        tasks.append({**task.summary(), "steps": stage_steps, "first_step": first_step})
        first_step += stage_steps
    return ScheduleRun(
        schedule, tuple(stages), list(steps), net, device, curve, tasks, time.perf_counter() - tic
    )
