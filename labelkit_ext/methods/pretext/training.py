"""Pretext training: epochs over the unlabeled training images, each batch turned into a
labelled pretext batch on the device; pretext accuracy on the validation images (their labels
are never read) after every epoch; checkpoints, resume and DDP under torchrun as in
``engine.fit``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from labelkit_ext.engine import (
    LAST_CHECKPOINT,
    TRAJECTORY_FIELDS,
    WORLD_SIZE_LABEL,
    DistInfo,
    StepSums,
    TrainConfig,
    autocast_for,
    barrier,
    broadcast_buffers,
    build_optimizer,
    build_scheduler,
    current_dist,
    data_fingerprint,
    data_parallel,
    derive_seed,
    grad_scaler,
    load_checkpoint,
    loader_over,
    progress_bar,
    refuse_resume,
    save_checkpoint,
    seed_everything,
    select_device,
    shuffle_epoch,
    shuffled_loader,
    sum_across_ranks,
)
from labelkit_ext.methods.pretext.networks import Backbone, PretextNet
from labelkit_ext.methods.pretext.tasks import (
    PretextSettings,
    build_pretext_net,
    check_task_images,
    jigsaw_permutations,
    pretext_step,
)

__all__ = ["PretextFit", "evaluate_pretext", "train_pretext"]

# What fixes the training trajectory (as engine.fit checks on resume); quiet, device etc. may change.
# Seed stream of the fixed validation batches (apart from every epoch's training stream).
_VAL_STREAM = 1_000_003


@dataclass
class PretextFit:
    """A trained pretext network; ``net.backbone`` is the representation to evaluate."""

    task: str
    net: PretextNet
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    train_seconds: float = 0.0

    @property
    def backbone(self) -> Backbone:
        return self.net.backbone


def _loader(
    dataset: Dataset,
    config: TrainConfig,
    shuffle: bool,
    device: torch.device,
    info: DistInfo | None = None,
) -> DataLoader:
    """Evaluation batches in order; training batches shuffled (each rank its
    ``DistributedSampler`` share under torchrun), an incomplete last one dropped: a batch of
    one image would break BatchNorm and the contrastive pairs."""
    sharded = shuffle and info is not None and info.enabled
    per_rank = -(-len(dataset) // info.world_size) if sharded else len(dataset)
    common = {
        "batch_size": config.batch_size if shuffle else config.eval_batch_size,
        "drop_last": shuffle and per_rank > config.batch_size,
        "num_workers": config.num_workers,
        "pin_memory": device.type == "cuda",
    }
    if shuffle:
        return shuffled_loader(dataset, info or current_dist(), config.seed, **common)
    return loader_over(dataset, SequentialSampler(dataset), **common)


def _stream(info: DistInfo, *parts: int) -> int:
    """The seed of a random stream: rank 0 (and a single process) draws (parts), rank r > 0
    (parts, r), so every rank's pretext labels and views differ and one process is unchanged."""
    return derive_seed(*parts, info.rank) if info.rank else derive_seed(*parts)


@torch.no_grad()
def evaluate_pretext(
    task: str,
    net: PretextNet,
    dataset: Dataset,
    settings: PretextSettings,
    config: TrainConfig,
    seed: int,
    permutations: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean pretext loss and accuracy of ``net`` on ``dataset``'s images, with batches drawn
    from ``seed`` (the same batches every call, so epochs compare)."""
    device = next(net.parameters()).device
    net.eval()
    generator = torch.Generator().manual_seed(seed)
    sums, count, seen = StepSums(device), 0, 0
    for images, _ in _loader(dataset, config, False, device):
        if task == "contrastive" and len(images) < 2:
            continue
        with autocast_for(device, config.amp):
            out = pretext_step(task, net, images.to(device), settings, generator, permutations)
        sums.add(out.loss, out.correct, len(images))
        count, seen = count + out.count, seen + len(images)
    total, correct = sums.read()
    return {"loss": total / max(seen, 1), "accuracy": correct / max(count, 1)}


def _train_epoch(
    task: str,
    net: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    settings: PretextSettings,
    config: TrainConfig,
    generator: torch.Generator,
    permutations: torch.Tensor | None,
    desc: str,
    info: DistInfo,
) -> dict[str, float]:
    """One epoch of ``net`` (a PretextNet, DDP-wrapped under torchrun); loss and accuracy over
    every rank's samples."""
    device = next(net.parameters()).device
    net.train()
    sums, count, seen = StepSums(device), 0, 0
    progress = not config.quiet and info.is_main and sys.stderr.isatty()
    bar = progress_bar(loader, desc, progress)
    for images, _ in bar:
        with autocast_for(device, config.amp):
            out = pretext_step(task, net, images.to(device), settings, generator, permutations,
                               across_ranks=True)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sums.add(out.loss, out.correct, len(images))
        count, seen = count + out.count, seen + len(images)
        if progress:  # reads the sums: a sync, only with a bar on screen
            total, correct = sums.read()
            bar.set_postfix(loss=f"{total / seen:.4f}", acc=f"{correct / max(count, 1):.3f}",
                            refresh=False)  # fmt: skip
    total, correct, count, seen = sum_across_ranks([*sums.read(), count, seen], info, device)
    return {"loss": total / max(seen, 1), "accuracy": correct / max(count, 1)}


def _resume(
    checkpoint: Path,
    task: str,
    settings: PretextSettings,
    config: TrainConfig,
    data: Any,
    world_size: int,
    names: Mapping[str, str],
) -> dict | None:
    """The checkpoint's state, or None without one; another task, pretext settings, training
    settings, process count (of an unfinished run) or training data (``data_fingerprint``) is
    refused, naming what changed (``names``: config fields as the options a user typed)."""
    if not checkpoint.is_file():
        return None
    state = load_checkpoint(checkpoint)
    saved_config = state.get("config") or {}
    # Not num_workers: the images are not augmented, and the batches are drawn in this process.
    saved = {"task": state.get("task"), **(state.get("settings") or {}),
             **{k: saved_config.get(k) for k in TRAJECTORY_FIELDS}}  # fmt: skip
    current = {"task": task, **settings.to_dict(),
               **{k: getattr(config, k) for k in TRAJECTORY_FIELDS}}  # fmt: skip
    # batch_size is per process; a finished run trains no further (checkpoints before: any)
    if "world_size" in state and int(state["epoch"]) < config.epochs:
        saved["world_size"], current["world_size"] = state["world_size"], world_size
    names = {"world_size": WORLD_SIZE_LABEL, **names}
    changed = [
        f"{names.get(k, k)}={saved.get(k)!r} -> {v!r}"
        for k, v in current.items()
        if saved.get(k) != v
    ]
    if "data" in state and state["data"] != data:  # checkpoints before it: settings only
        changed.append("other training images (another --split-seed or data set?)")
    refuse_resume(checkpoint, changed)
    return state


def train_pretext(
    task: str,
    backbone: Backbone,
    train_set: Dataset,
    val_set: Dataset | None,
    config: TrainConfig,
    settings: PretextSettings | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    setting_names: Mapping[str, str] | None = None,
) -> PretextFit:
    """Train ``backbone`` with ``task``'s head for ``config.epochs`` epochs on the images of
    ``train_set`` (its targets are ignored); report the pretext accuracy on ``val_set``.

    The data order, pretext labels, tile jitter and views of epoch ``e`` are drawn from
    ``(config.seed, e)`` alone, so a resumed run retraces an uninterrupted one. With
    ``out_dir`` the state is saved after every epoch (``checkpoint_last.pt``, loaded with
    ``weights_only=True``) and ``resume`` continues from it; a resume with other settings is
    refused, naming them (``setting_names``: ``config`` fields as the caller's options, e.g.
    ``{"epochs": "pretext_epochs"}``). Under torchrun the net is wrapped
    in DDP and each rank trains on its share of the images (``batch_size`` per process; the
    contrastive task's negatives are the views of every rank, SimCLR's global batch); rank 0
    logs and writes checkpoints.
    """
    settings = settings or PretextSettings()
    check_task_images(task, train_set)
    info = current_dist()
    device = select_device(config.device)
    seed_everything(config.seed)  # the head's initialisation
    net = build_pretext_net(task, backbone, settings).to(device)
    optimizer = build_optimizer(net.parameters(), config)
    scheduler = build_scheduler(optimizer, config)
    scaler = grad_scaler(device, config.amp)
    permutations = jigsaw_permutations(settings, device) if task == "jigsaw" else None
    fitted = PretextFit(task, net)
    checkpoint = Path(out_dir) / LAST_CHECKPOINT if out_dir is not None else None
    data = data_fingerprint(train_set)
    state = (
        _resume(checkpoint, task, settings, config, data, info.world_size, setting_names or {})
        if resume and checkpoint
        else None
    )
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # a disabled scaler ignores it
            scaler.load_state_dict(state["scaler"])
        fitted.history, fitted.resumed_from = list(state["history"]), int(state["epoch"])
    model = data_parallel(net, device, info)
    loader = _loader(train_set, config, True, device, info)
    start = time.perf_counter()
    for epoch in range(fitted.resumed_from, config.epochs):
        tic = time.perf_counter()
        seed_everything(_stream(info, config.seed, epoch))
        shuffle_epoch(loader, config.seed, epoch)
        generator = torch.Generator().manual_seed(_stream(info, config.seed, epoch, 1))
        lr = optimizer.param_groups[0]["lr"]
        train = _train_epoch(
            task, model, loader, optimizer, scaler, settings, config, generator, permutations,
            f"{task} {epoch + 1}/{config.epochs}", info,
        )  # fmt: skip
        scheduler.step()
        broadcast_buffers(net, info)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": train["loss"],
                  "train_accuracy": train["accuracy"]}  # fmt: skip
        if val_set is not None:
            val = evaluate_pretext(
                task, net, val_set, settings, config, derive_seed(config.seed, _VAL_STREAM),
                permutations,
            )  # fmt: skip
            record.update({"val_loss": val["loss"], "val_accuracy": val["accuracy"]})
        record["seconds"] = time.perf_counter() - tic
        fitted.history.append(record)
        if not config.quiet and info.is_main:
            val_text = (
                f" | val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.3f}"
                if val_set is not None
                else ""
            )
            print(
                f"[pretext {task}] epoch {epoch + 1} | train loss {train['loss']:.4f} "
                f"acc {train['accuracy']:.3f}{val_text} | {record['seconds']:.1f}s",
                flush=True,
            )
        if checkpoint is not None and info.is_main:
            save_checkpoint(
                checkpoint,
                {
                    "epoch": epoch + 1,
                    "task": task,
                    "settings": settings.to_dict(),
                    "config": config.to_dict(),
                    "data": data,
                    "world_size": info.world_size,
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),  # {} when disabled
                    "scheduler": scheduler.state_dict(),
                    "history": fitted.history,
                },
            )
        barrier(info)
    fitted.train_seconds = time.perf_counter() - start
    return fitted
