"""Train and evaluate loops, and ``fit``: epochs with checkpoints, resume and DDP."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset
from tqdm.auto import tqdm

from labelkit_ext.data.core import dataset_targets
from labelkit_ext.engine.checkpoint import load_checkpoint, save_checkpoint
from labelkit_ext.engine.config import (
    TRAJECTORY_FIELDS,
    TrainConfig,
    build_optimizer,
    build_scheduler,
)
from labelkit_ext.engine.device import select_device
from labelkit_ext.engine.distributed import (
    DistInfo,
    barrier,
    broadcast_buffers,
    current_dist,
    data_parallel,
    gather_shards,
    loader_over,
    shuffle_epoch,
    shuffled_loader,
    sum_across_ranks,
)
from labelkit_ext.engine.metrics import classification_metrics, scores_from_logits
from labelkit_ext.engine.seeding import derive_seed, seed_everything
from labelkit_ext.errors import UsageError
from labelkit_ext.fingerprint import tensor_digest

__all__ = [
    "LAST_CHECKPOINT",
    "EpochEnd",
    "FitResult",
    "Predictions",
    "StepSums",
    "amp_dtype",
    "autocast_for",
    "check_targets",
    "data_fingerprint",
    "grad_scaler",
    "evaluate",
    "fit",
    "loss_for_task",
    "predict",
    "prediction_metrics",
    "progress_bar",
    "refuse_resume",
    "tensor_shape_changes",
    "train_one_epoch",
]

LAST_CHECKPOINT = "checkpoint_last.pt"


@dataclass
class Predictions:
    """Raw outputs over a dataset, in dataset order."""

    logits: torch.Tensor  # float32 (N, K), on the CPU
    targets: torch.Tensor

    def scores(self, task: str) -> torch.Tensor:
        return scores_from_logits(self.logits, task)


@dataclass
class EpochEnd:
    """What a callback sees after each epoch (and after its checkpoint is written)."""

    epoch: int  # epochs completed
    record: dict
    model: nn.Module


@dataclass
class FitResult:
    model: nn.Module  # unwrapped from DDP
    history: list[dict] = field(default_factory=list)
    device: torch.device = torch.device("cpu")
    resumed_from: int = 0  # epochs already done in the checkpoint resumed from
    train_seconds: float = 0.0


def check_targets(
    dataset: Dataset | None, task: str, num_classes: int | None, name: str = "dataset"
) -> None:
    """Refuse targets the task's loss cannot take, before any training (they failed mid-epoch
    with "Target 3 is out of bounds" or a dtype error): ``multiclass`` one int64 (or uint8)
    class in [0, num_classes) per sample, ``multilabel`` float rows of num_classes labels.
    Checked where the targets are known without loading the samples (``data.dataset_targets``)."""
    targets = None if dataset is None else dataset_targets(dataset, read_items=False)
    if targets is None or targets.numel() == 0:
        return
    if task == "multiclass":
        if targets.dim() != 1 or targets.dtype not in (torch.int64, torch.uint8):
            hint = ".long()" if targets.dim() == 1 else "multi-hot rows: task='multilabel'"
            raise UsageError(
                f"{name}: multiclass targets must be one int64 class per sample (what "
                f"cross-entropy takes), got {targets.dtype} of shape {tuple(targets.shape)} ({hint})"
            )
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            raise UsageError(
                f"{name}: targets must be classes in [0, {num_classes}) for a model of "
                f"{num_classes} outputs, got values in [{low}, {high}]"
            )
    elif task == "multilabel":
        width = targets.shape[-1] if targets.dim() == 2 else None
        if not targets.dtype.is_floating_point or (
            num_classes is not None and width != num_classes
        ):
            raise UsageError(
                f"{name}: multilabel targets must be float rows of {num_classes} labels, got "
                f"{targets.dtype} of shape {tuple(targets.shape)} (integer rows: .float())"
            )


def loss_for_task(task: str) -> nn.Module:
    """Cross-entropy for class indices, binary cross-entropy on logits for multi-hot targets."""
    if task == "multiclass":
        return nn.CrossEntropyLoss()
    if task == "multilabel":
        return nn.BCEWithLogitsLoss()
    raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype on CUDA ``device``: bfloat16 where the GPU computes it natively
    (compute capability 8.0+: Ampere, Hopper, ...), else float16 with loss scaling. Not
    ``torch.cuda.is_bf16_supported()``: it also says yes where bfloat16 is only emulated (T4,
    V100: several times slower than float16), and it asks the current device, not ``device``."""
    if device.type != "cuda":
        raise ValueError(
            f"amp_dtype: device must be a CUDA device, got {device} (CPU runs float32)"
        )
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def autocast_for(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Autocast in ``amp_dtype(device)`` on a GPU; nothing on CPU (float32)."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=amp_dtype(device))


def grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """Loss scaling for float16 autocast; elsewhere a disabled scaler, whose ``scale``, ``step``
    and ``update`` are plain ``backward`` / ``optimizer.step()`` (one training step serves
    both)."""
    enabled = amp and device.type == "cuda" and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=enabled)


def _show_progress(quiet: bool, info: DistInfo) -> bool:
    return not quiet and info.is_main and sys.stderr.isatty()


class StepSums:
    """Running (loss x samples, correct decisions) of a training or evaluation pass, kept on the
    device in float64 (the arithmetic of Python floats) and read once per pass: no step waits
    for the GPU. Shared by the engine's and the methods' own loops."""

    def __init__(self, device: torch.device) -> None:
        self.values = torch.zeros(2, dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, hits: torch.Tensor, samples: int) -> None:
        """One step's mean ``loss`` over ``samples`` and its ``hits`` (device scalars)."""
        self.values[0] += loss.detach().double() * samples
        self.values[1] += hits

    def read(self) -> tuple[float, float]:
        """(loss sum, hits): a host sync."""
        loss, hits = self.values.tolist()
        return loss, hits


def _hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Correct decisions, on the device: argmax hits, or per-label hits at logit 0."""
    if targets.ndim == 1:
        return (logits.argmax(1) == targets).sum()
    return ((logits > 0).float() == targets).sum()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
    *,
    amp: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    progress: bool = False,
    desc: str = "train",
    dist_info: DistInfo | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns the sample-weighted mean loss and accuracy (over all
    ranks' samples under DDP)."""
    model.train()
    sums, decisions, seen = StepSums(device), 0, 0
    bar = progress_bar(loader, desc, progress)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_for(device, amp):
            logits = model(images)
            loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = len(targets)
        sums.add(loss, _hits(logits.detach(), targets), n)
        decisions, seen = decisions + targets.numel(), seen + n
        if progress:
            bar.set_postfix(loss=f"{sums.read()[0] / seen:.4f}", refresh=False)
    total_loss, correct, decisions, seen = sum_across_ranks(
        [*sums.read(), decisions, seen], dist_info or current_dist(), device
    )
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(decisions, 1)}


def progress_bar(loader: DataLoader, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar over one pass of ``loader`` (shown when ``enabled``).

    The bar is handed an iterator, not the loader: tqdm.auto's class calls ``iter()`` on what
    it is given as it is built, and every ``iter()`` of a DataLoader starts its workers and
    draws from its generator; the loop's own ``iter()`` then started a second pass, so each
    epoch spawned its workers twice and its order shifted with the number of workers.
    """
    return tqdm(iter(loader), total=len(loader), desc=desc, leave=False, disable=not enabled,
                dynamic_ncols=True)  # fmt: skip


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    *,
    batch_size: int = 256,
    amp: bool = False,
    num_workers: int = 0,
    progress: bool = False,
    dist_info: DistInfo | None = None,
) -> Predictions:
    """Logits and targets for every item of ``dataset``, in order.

    Under DDP each rank scores the strided shard ``range(rank, N, world_size)`` and the shards
    are gathered, so every rank returns the full, unpadded result.
    """
    info = dist_info or current_dist()
    total = len(dataset)
    shard = Subset(dataset, range(info.rank, total, info.world_size)) if info.enabled else dataset
    loader = loader_over(
        shard,
        SequentialSampler(shard),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    model.eval()
    logits, targets = [], []
    for images, target in progress_bar(loader, "eval", progress):
        with autocast_for(device, amp):
            logits.append(model(images.to(device, non_blocking=True)).float().cpu())
        targets.append(target)
    if not logits:  # an empty shard still has to take part in the gather
        sample = dataset[0][1] if total else torch.zeros(())
        out_dim = getattr(model, "num_classes", 0)
        logits, targets = (
            [torch.zeros(0, out_dim)],
            [torch.zeros((0, *sample.shape), dtype=sample.dtype)],
        )
    return Predictions(
        gather_shards(torch.cat(logits), total, info),
        gather_shards(torch.cat(targets), total, info),
    )


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    task: str,
    device: torch.device,
    *,
    class_names: Sequence[str] | None = None,
    batch_size: int = 256,
    amp: bool = False,
    num_workers: int = 0,
    progress: bool = False,
    dist_info: DistInfo | None = None,
) -> dict:
    """``classification_metrics`` of the model on ``dataset``, plus its mean ``loss``."""
    pred = predict(
        model,
        dataset,
        device,
        batch_size=batch_size,
        amp=amp,
        num_workers=num_workers,
        progress=progress,
        dist_info=dist_info,
    )
    return prediction_metrics(pred, task, class_names)


def prediction_metrics(
    pred: Predictions, task: str, class_names: Sequence[str] | None = None
) -> dict:
    """``classification_metrics`` of ``pred`` plus the mean ``loss`` of its logits."""
    metrics = classification_metrics(pred.scores(task), pred.targets, task, class_names)
    metrics["loss"] = float(loss_for_task(task)(pred.logits, pred.targets).item())
    return metrics


def _train_loader(
    dataset: Dataset, config: TrainConfig, info: DistInfo, device: torch.device
) -> DataLoader:
    # A last batch of one sample cannot train BatchNorm ("Expected more than 1 value per channel
    # when training"): drop it, and only it (a label fraction of 10 % of digits gave one).
    per_rank = math.ceil(len(dataset) / info.world_size) if info.enabled else len(dataset)
    common = {
        "batch_size": config.batch_size,
        "num_workers": config.num_workers,
        "pin_memory": device.type == "cuda",
        "drop_last": per_rank > config.batch_size and per_rank % config.batch_size == 1,
    }
    return shuffled_loader(dataset, info, config.seed, **common)


def _start_epoch(loader: DataLoader, config: TrainConfig, epoch: int, info: DistInfo) -> None:
    """Make epoch ``epoch`` a function of (seed, epoch, rank) alone (see ``derive_seed``).

    A training set with a ``set_epoch(epoch)`` method (as ``DistributedSampler`` has) is told
    the epoch too, so a dataset that varies by epoch also resumes where it left off.
    """
    seed_everything(derive_seed(config.seed, epoch, info.rank))
    set_epoch = getattr(loader.dataset, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)
    shuffle_epoch(loader, config.seed, epoch)


# Each worker draws the augmentation from its own seeded stream: another count, another run.
_FIT_TRAJECTORY_FIELDS = (*TRAJECTORY_FIELDS, "num_workers")
# What a finished checkpoint, which trains no further, may be resumed with another of: the worker
# count, and the process count (batch_size is per process: another count, another global batch).
_UNTIL_FINISHED = ("num_workers", "world_size")
WORLD_SIZE_LABEL = "processes (torchrun --nproc_per_node)"


def run_identity(
    model: nn.Module, train_set: Dataset, val_set: Dataset | None, class_names
) -> dict[str, Any]:
    """What a checkpoint was trained on besides its settings: the architecture (class and
    parameter shapes), the data's sizes, one input's shape, the class names and the training
    data's fingerprint (``data_fingerprint``). A resume from another data set, split, image
    size or model would otherwise continue silently from foreign weights (or fail in
    load_state_dict), and score them on images they were trained on."""
    return {
        "model": type(model).__name__,
        "parameters": {k: list(v.shape) for k, v in model.state_dict().items()},
        "train_samples": len(train_set),
        "val_samples": len(val_set) if val_set is not None else None,
        "input_shape": list(train_set[0][0].shape) if len(train_set) else None,
        "class_names": list(class_names) if class_names is not None else None,
        "data": data_fingerprint(train_set),
    }


def data_fingerprint(dataset: Dataset) -> dict[str, Any] | None:
    """What identifies a training set: its own ``fingerprint()`` where it has one (the data
    sets of ``labelkit_ext.data``: a digest of the targets in order and the transform), else a
    digest of the targets where they are known without loading the samples (a ``targets``
    attribute, a ``TensorDataset``'s), under the digests of the indices of the ``Subset``s
    around it; None when nothing is known."""
    if isinstance(dataset, Subset):
        indices = torch.as_tensor(np.asarray(dataset.indices, dtype=np.int64))
        return {"indices": tensor_digest(indices), "of": data_fingerprint(dataset.dataset)}
    describe = getattr(dataset, "fingerprint", None)
    if callable(describe):
        return describe()
    targets = dataset_targets(dataset, read_items=False)
    return None if targets is None else {"targets": tensor_digest(targets)}


def _check_resumable(
    state: dict, config: TrainConfig, run: dict, checkpoint: Path, names: Mapping[str, str]
) -> None:
    saved, current = state.get("config"), config.to_dict()
    if not isinstance(saved, dict):
        raise UsageError(f"cannot resume from {checkpoint}: it holds no training settings")
    finished = int(state.get("epoch", 0)) >= config.epochs
    names = {"world_size": WORLD_SIZE_LABEL, **names}
    changed = [
        f"{names.get(k, k)}={saved.get(k)!r} -> {current[k]!r}"
        for k in _FIT_TRAJECTORY_FIELDS
        if saved.get(k) != current[k] and not (finished and k in _UNTIL_FINISHED)
    ]
    # checkpoints from before run identities: settings only; before world_size: any count
    saved_run = state.get("run") or {}
    describe = {"parameters": tensor_shape_changes, "data": _data_change}
    changed += [
        describe[k](saved_run[k], run[k])
        if k in describe
        else f"{names.get(k, k)}={saved_run[k]!r} -> {run[k]!r}"
        for k in run
        if k in saved_run and saved_run[k] != run[k] and not (finished and k in _UNTIL_FINISHED)
    ]
    refuse_resume(checkpoint, [c for c in changed if c])
    if "data" in run and _partly_unknown(saved_run.get("data", run["data"]), run["data"]):
        warnings.warn(
            f"resuming from {checkpoint} without knowing whether all of the training data are the "
            "same: the dataset (now, or when the checkpoint was written) has no targets "
            "attribute or fingerprint() (engine.data_fingerprint)",
            stacklevel=3,
        )


def refuse_resume(checkpoint: Path, changed: Sequence[str]) -> None:
    """The refusal of a resume from ``checkpoint`` naming what ``changed`` (none: no-op)."""
    if changed:
        raise UsageError(
            f"cannot resume from {checkpoint}: it was trained with other settings or data "
            f"({', '.join(changed)}); resume with the same ones, or use another --out"
        )


def _partly_unknown(saved: dict | None, current: dict | None) -> bool:
    """Whether either fingerprint has an unknown part (None): a dataset without targets or
    fingerprint(), now or in a checkpoint written before the engine digested such targets."""
    return None in _leaves(saved).values() or None in _leaves(current).values()


def _data_change(saved: dict | None, current: dict | None) -> str:
    """What differs between two ``data_fingerprint``s: the samples, the transform, or both
    ('' for none). Where either has an unknown part, only the parts both know are compared
    (an older checkpoint of a TensorDataset recorded None for what is now a digest)."""
    a, b = _leaves(saved), _leaves(current)
    keys = sorted(a.keys() | b.keys())
    if _partly_unknown(saved, current):
        keys = [k for k in keys if a.get(k) is not None and b.get(k) is not None]
    parts = []
    if any(a.get(k) != b.get(k) for k in keys if not k.endswith("transform")):
        parts.append("other training samples or order (another --split-seed or data set?)")
    parts += [
        f"training transform {a.get(k)} -> {b.get(k)} (--no-augment?)"
        for k in keys
        if k.endswith("transform") and a.get(k) != b.get(k)
    ]
    return ", ".join(parts)


def _leaves(tree: Any, path: str = "") -> dict[str, Any]:
    """A nested dict's leaves by dotted path."""
    if not isinstance(tree, dict):
        return {path: tree}
    return {
        k: v
        for key, value in tree.items()
        for k, v in _leaves(value, f"{path}.{key}" if path else key).items()
    }


def tensor_shape_changes(saved: dict, current: dict) -> str:
    """Which model tensors differ between a checkpoint's and a model's ``{name: shape}``: a few
    names each of the missing, the new and the reshaped ones."""

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    parts = [
        f"{what} {names(keys)}"
        for what, keys in (
            ("the checkpoint lacks", [k for k in current if k not in saved]),
            ("this model lacks", [k for k in saved if k not in current]),
            ("other shapes for", [k for k in current if k in saved and saved[k] != current[k]]),
        )
        if keys
    ]
    return f"model tensors differ: {'; '.join(parts)}"


def _log(message: str, config: TrainConfig, info: DistInfo) -> None:
    if not config.quiet and info.is_main:
        print(message, flush=True)


def _summary(record: dict) -> str:
    parts = [
        f"epoch {record['epoch']}",
        f"lr {record['lr']:.4g}",
        f"train loss {record['train_loss']:.4f}",
    ]
    parts += [
        f"val {k} {record[f'val_{k}']:.4f}"
        for k in ("loss", "accuracy", "auc")
        if record.get(f"val_{k}") is not None
    ]
    return " | ".join(parts + [f"{record['seconds']:.1f}s"])


def _check_converging(loss: float, epoch: int, config: TrainConfig, device: torch.device) -> None:
    """A NaN/inf training loss ends the run with what to change, not a traceback from the
    metrics of NaN predictions later. The loss is summed over ranks: every rank raises."""
    if math.isfinite(loss):
        return
    fixes = [f"lower the learning rate (lr={config.lr:g})"]
    if config.optimizer == "sgd":
        fixes.append(f"the momentum ({config.momentum:g})")
    if config.amp and device.type == "cuda":
        fixes.append("turn off amp")
    raise UsageError(
        f"training diverged in epoch {epoch + 1}: the mean training loss is {loss}; "
        + " or ".join(fixes)
    )


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    task: str,
    config: TrainConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    class_names: Sequence[str] | None = None,
    callbacks: Sequence[Callable[[EpochEnd], None]] = (),
    loss_fn: nn.Module | None = None,
    checkpoint_seconds: float = 0.0,
    identity: dict[str, Any] | None = None,
    setting_names: Mapping[str, str] | None = None,
) -> FitResult:
    """Train ``model`` for ``config.epochs`` epochs, validating after each.

    With ``out_dir``, rank 0 writes ``out_dir/checkpoint_last.pt`` (model, optimiser,
    scheduler, scaler, history) after every epoch — or, with ``checkpoint_seconds > 0``, after
    the epochs that end at least that long after the last write, and after the last epoch
    (for many short epochs, where writing would cost more than training); ``resume``
    continues from it (a fresh start when there is none). Under torchrun (see
    ``init_distributed``) the model is wrapped in DDP and each rank trains on its
    ``DistributedSampler`` share. Seed the model's initialisation yourself
    (``seed_everything``) before building it.

    A resume is refused (``UsageError`` naming what differs) when the checkpoint was trained
    with other settings, model or data (``run_identity``) or other ``identity``: JSON-like
    facts of the caller's own that the run depends on (a method's options outside ``config``).
    ``setting_names`` renames ``config`` fields and identity keys in that message to the
    options a user typed (``{"epochs": "sub_epochs"}``).
    """
    if not (isinstance(checkpoint_seconds, (int, float)) and 0 <= checkpoint_seconds < math.inf):
        raise ValueError(
            f"checkpoint_seconds must be a finite number >= 0, got {checkpoint_seconds!r}"
        )
    if loss_fn is None:
        for name, dataset in (("train_set", train_set), ("val_set", val_set)):
            check_targets(dataset, task, getattr(model, "num_classes", None), name)
    info = current_dist()
    device = select_device(config.device, info.local_rank)
    model = model.to(device)
    optimizer = build_optimizer(model.parameters(), config)
    scheduler = build_scheduler(optimizer, config)
    scaler = grad_scaler(device, config.amp)
    loss_fn = loss_fn or loss_for_task(task)
    checkpoint = Path(out_dir) / LAST_CHECKPOINT if out_dir is not None else None
    result = FitResult(model=model, device=device)
    run = (
        {
            **run_identity(model, train_set, val_set, class_names),
            "world_size": info.world_size,
            **(identity or {}),
        }
        if checkpoint
        else {}
    )
    if resume and checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint, map_location=device)
        _check_resumable(state, config, run, checkpoint, setting_names or {})
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # a disabled scaler ignores it (resumed on a bfloat16 GPU)
            scaler.load_state_dict(state["scaler"])
        result.history, result.resumed_from = list(state["history"]), int(state["epoch"])
        _log(f"resumed from {checkpoint} after epoch {result.resumed_from}", config, info)
    elif resume:
        _log(f"no checkpoint at {checkpoint}; starting from scratch", config, info)
    net = data_parallel(model, device, info)
    loader = _train_loader(train_set, config, info, device)
    progress = _show_progress(config.quiet, info)
    start = saved_at = time.perf_counter()
    for epoch in range(result.resumed_from, config.epochs):
        tic = time.perf_counter()
        _start_epoch(loader, config, epoch, info)
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(
            net,
            loader,
            optimizer,
            loss_fn,
            device,
            amp=config.amp,
            scaler=scaler,
            progress=progress,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            dist_info=info,
        )
        _check_converging(train["loss"], epoch, config, device)
        scheduler.step()
        broadcast_buffers(model, info)
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
        }
        if val_set is not None:
            val = evaluate(
                model,
                val_set,
                task,
                device,
                class_names=class_names,
                batch_size=config.eval_batch_size,
                amp=config.amp,
                num_workers=config.num_workers,
                dist_info=info,
            )
            record.update(
                {"val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_auc": val["auc"]}
            )
        record["seconds"] = time.perf_counter() - tic
        result.history.append(record)
        _log(_summary(record), config, info)
        due = time.perf_counter() - saved_at >= checkpoint_seconds or epoch + 1 == config.epochs
        if checkpoint is not None and info.is_main and due:
            saved_at = time.perf_counter()
            save_checkpoint(
                checkpoint,
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),  # {} when disabled
                    "history": result.history,
                    "config": config.to_dict(),
                    "run": run,
                },
            )
        barrier(info)
        for callback in callbacks:
            callback(EpochEnd(epoch + 1, record, model))
    result.train_seconds = time.perf_counter() - start
    return result
