"""What every method shares: the data options and loading, run folders, results output."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from labelkit_ext.checks import SEED_LIMIT, check_fields
from labelkit_ext.data import DataSplits, available_datasets, load_dataset
from labelkit_ext.engine import current_dist, format_table, option, versions, write_json
from labelkit_ext.errors import UsageError
from labelkit_ext.models import check_model_input

__all__ = [
    "RESULTS_FILE",
    "DataConfig",
    "load_data",
    "check_run_config",
    "default_run_dir",
    "prepare_run_dir",
    "dataset_summary",
    "metrics_table",
    "write_results",
]

RESULTS_FILE = "results.json"


@dataclass
class DataConfig:
    """Which data set, from where, at what size and split: what ``load_dataset`` needs."""

    dataset: str = option(
        "digits",
        "data set (digits and digit-mosaic are embedded)",
        choices=available_datasets,
    )
    data_dir: str | None = option(
        None,
        "folder (or file) holding the data; default $LABELKIT_DATA, else ../shared/data",
        metavar="DIR",
    )
    image_size: int | None = option(
        None, "model input size (default: the data set's own; digits 32)", metavar="PX"
    )
    val_fraction: float = option(
        0.1, "share of train held out for validation where the release has no val split"
    )
    split_seed: int = option(0, "seed of the data splits (not of training)")
    augment: bool = option(True, "random crop / flip on the training images")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.image_size is not None and self.image_size < 1:
            raise UsageError(f"image_size must be >= 1, got {self.image_size}")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def sized(self, defaults: Mapping[str, int]) -> DataConfig:
        """This config with a method's own input size for the data sets in ``defaults`` (name ->
        px), where ``image_size`` was not given."""
        if self.image_size is None and self.dataset in defaults:
            return replace(self, image_size=defaults[self.dataset])
        return self


def load_data(config: DataConfig) -> DataSplits:
    """``load_dataset`` as ``config`` describes it."""
    return load_dataset(
        config.dataset,
        config.data_dir,
        image_size=config.image_size,
        val_fraction=config.val_fraction,
        split_seed=config.split_seed,
        augment=config.augment,
    )


def default_run_dir(method: str, data: DataConfig) -> Path:
    """``runs/<method>-<dataset>``: where a run writes when no output folder is given."""
    return Path("runs") / f"{method}-{data.dataset}"


def prepare_run_dir(
    method: str, data: DataConfig, out_dir: str | os.PathLike | None = None
) -> Path:
    """The run's output folder (``out_dir``, else ``default_run_dir``), created now: a path
    that cannot be a writable folder fails here, before any data is loaded or any training."""
    if out_dir is not None and not str(out_dir).strip():
        raise UsageError(
            f"--out must name a folder, got {str(out_dir)!r} (leave it out for "
            f"{default_run_dir(method, data)})"
        )
    out = Path(out_dir).expanduser() if out_dir is not None else default_run_dir(method, data)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: pass a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, no permission, a read-only disk
        reason = exc.strerror or exc
        raise UsageError(f"--out {out}: cannot create the output folder: {reason}") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the output folder is not writable")
    return out


def check_run_config(config: Any, image_size: int | None = None) -> None:
    """Checks every method's run config shares, before any data is loaded: the model (a
    ``model`` field, when there is one) takes the input size (``image_size``, else
    ``config.data.image_size``, when known), and the seeds ``seed .. seed + num_seeds - 1``
    stay in numpy's range."""
    size = image_size if image_size is not None else config.data.image_size
    if getattr(config, "model", None) is not None:
        check_model_input(config.model, size)
    last = config.train.seed + getattr(config, "num_seeds", 1) - 1
    if last >= SEED_LIMIT:
        raise UsageError(
            f"seed + num_seeds - 1 = {last} is beyond the seed range [0, 2**32): lower --seed"
        )


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


def write_results(out_dir: str | os.PathLike, results: dict[str, Any], started: float) -> Path:
    """Add versions, world size and total time (since ``started``, a ``time.perf_counter()``)
    to ``results``; rank 0 writes ``out_dir``/results.json."""
    results.setdefault("timings", {})["total_seconds"] = time.perf_counter() - started
    results["versions"] = versions()
    results["world_size"] = current_dist().world_size
    path = Path(out_dir) / RESULTS_FILE
    if current_dist().is_main:
        write_json(path, results)
    return path
