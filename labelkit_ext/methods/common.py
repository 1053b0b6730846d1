"""What every method shares: its command-line options, data loading from them, run output."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from labelkit_ext.data import DataSplits, available_datasets, load_dataset
from labelkit_ext.engine import (
    OPTIMIZERS,
    SCHEDULERS,
    TrainConfig,
    current_dist,
    format_table,
    versions,
    write_json,
)
from labelkit_ext.models import available_models

__all__ = [
    "RESULTS_FILE",
    "add_data_arguments",
    "add_run_arguments",
    "add_training_arguments",
    "load_data",
    "train_config",
    "run_dir",
    "dataset_summary",
    "metrics_table",
    "write_results",
]

RESULTS_FILE = "results.json"


def add_data_arguments(parser: argparse.ArgumentParser, default_dataset: str = "digits") -> None:
    """--dataset, --data-dir, --image-size, --val-fraction, --split-seed, --no-augment."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default=default_dataset,
        choices=available_datasets(),
        help="data set (default: %(default)s; digits and digit-mosaic are embedded)",
    )
    group.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="folder (or file) holding the data; default $LABELKIT_DATA, else ../shared/data",
    )
    group.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="PX",
        help="model input size (default: the data set's own; digits 32)",
    )
    group.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of train held out for validation where the release has no val split",
    )
    group.add_argument(
        "--split-seed", type=int, default=0, help="seed of the data splits (not of training)"
    )
    group.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="no random crop / flip on the training images",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--out, --seed, --device, --quiet."""
    group = parser.add_argument_group("run")
    group.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder for results.json, plots, checkpoints (default runs/<method>-<dataset>)",
    )
    group.add_argument("--seed", type=int, default=0, help="training seed")
    group.add_argument(
        "--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)"
    )
    group.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def add_training_arguments(
    parser: argparse.ArgumentParser,
    *,
    model: str = "small-cnn",
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.05,
) -> None:
    """Model and optimisation options for methods that train with ``engine.fit``."""
    group = parser.add_argument_group("training")
    group.add_argument(
        "--model", default=model, choices=available_models(), help="network (default: %(default)s)"
    )
    group.add_argument(
        "--pretrained", default=None, metavar="FILE", help="initial weights from a local file"
    )
    group.add_argument("--epochs", type=int, default=epochs, help="default: %(default)s")
    group.add_argument(
        "--batch-size", type=int, default=batch_size, help="per process; default: %(default)s"
    )
    group.add_argument("--lr", type=float, default=lr, help="default: %(default)s")
    group.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight-decay", type=float, default=5e-4)
    group.add_argument(
        "--scheduler", default="cosine", choices=SCHEDULERS, help="stepped per epoch"
    )
    group.add_argument("--no-amp", dest="amp", action="store_false", help="no autocast on GPU")
    group.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    group.add_argument(
        "--resume", action="store_true", help="continue from the run's checkpoints in OUT when they exist"
    )


def load_data(args: argparse.Namespace) -> DataSplits:
    """``load_dataset`` from the data options."""
    return load_dataset(
        args.dataset,
        args.data_dir,
        image_size=args.image_size,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        augment=args.augment,
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    """``TrainConfig`` from the run and training options."""
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        scheduler=args.scheduler,
        amp=args.amp,
        seed=args.seed,
        device=args.device,
        num_workers=args.num_workers,
        quiet=args.quiet,
    )


def run_dir(args: argparse.Namespace, method: str) -> Path:
    """``--out``, or ``runs/<method>-<dataset>``."""
    return Path(args.out) if args.out else Path("runs") / f"{method}-{args.dataset}"


def dataset_summary(splits: DataSplits) -> dict[str, Any]:
    """Name, task, classes, input shape and split sizes, for results.json."""
    info = splits.info
    return {
        "name": info.name,
        "task": info.task,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "in_channels": info.in_channels,
        "image_size": info.image_size,
        "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
    }


def metrics_table(metrics_by_split: dict[str, dict], title: str = "") -> str:
    """One row per split: n, loss, accuracy, top-5 / exact match where defined, mean AUC."""
    columns = ["n", "loss", "accuracy"]
    for extra in ("top5_accuracy", "exact_match"):
        if any(extra in m for m in metrics_by_split.values()):
            columns.append(extra)
    columns.append("auc")
    rows = [[split, *(m.get(c) for c in columns)] for split, m in metrics_by_split.items()]
    table = format_table(rows, ["split", *columns])
    return f"{title}\n{table}" if title else table


def write_results(out_dir: Path, results: dict[str, Any], started: float) -> Path:
    """Add versions, world size and total time to ``results``; rank 0 writes results.json."""
    results.setdefault("timings", {})["total_seconds"] = time.perf_counter() - started
    results["versions"] = versions()
    results["world_size"] = current_dist().world_size
    path = out_dir / RESULTS_FILE
    if current_dist().is_main:
        write_json(path, results)
    return path
